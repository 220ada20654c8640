"""A Ray Serve YAML file whose applications use `raystack.app:build_app`: read, validated against Serve's
schema and raystack's, and checked against Serve's own options where they meet raystack's.

Serve's proxy ends a request at `http_options.request_timeout_s` silently: a stream just stops, with no
error event and no `data: [DONE]`. The router's own bound (`router.request_timeout_s`) ends it with an
error event, so the proxy's must not be shorter; config check refuses such a file, and build_app refuses
to deploy under such a proxy.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from raystack.config import ConfigError, RaystackConfig, parse_config

BUILD_APP_IMPORT_PATH = "raystack.app:build_app"


def proxy_timeout_problem(proxy_timeout_s: float | None, config: RaystackConfig) -> str | None:
    router = config.router.request_timeout_s
    if proxy_timeout_s is None or proxy_timeout_s >= router:
        return None
    return (f"http_options.request_timeout_s ({proxy_timeout_s:g} s) is shorter than router.request_timeout_s "
            f"({router:g} s): Serve's proxy would cut longer answers silently, with no error event and no [DONE]. "
            f"Raise it to at least {router:g}, or leave it unset (the router bounds every request)")


def load_serve_config(path: str | Path) -> list[tuple[str, RaystackConfig]]:
    """Validate a Ray Serve YAML file; return (application name, config) for each raystack app."""
    from ray.serve.schema import ServeDeploySchema

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a Ray Serve config (a mapping with `applications:`)")
    try:
        ServeDeploySchema.model_validate(raw)
    except Exception as err:  # Ray's pydantic (v1 or v2 API) error; its text names the field
        raise ConfigError(f"{path}: not a valid Ray Serve config:\n{err}") from None

    apps = []
    for i, app in enumerate(raw.get("applications") or []):
        if app.get("import_path") != BUILD_APP_IMPORT_PATH:
            continue
        name = app.get("name", "default")
        config = parse_config(app.get("args"), where=f"applications[{i}].args")
        problem = proxy_timeout_problem((raw.get("http_options") or {}).get("request_timeout_s"), config)
        if problem:
            raise ConfigError(f"{path}: {problem}")
        apps.append((name, config))
    if not apps:
        raise ConfigError(f"{path}: no application has import_path: {BUILD_APP_IMPORT_PATH}")
    return apps
