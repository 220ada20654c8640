"""A Ray Serve YAML file of raystack applications: read, validated against Serve's schema and raystack's,
and checked where its applications meet each other and Serve's own options.

A router application (`raystack.app:build_router`) and the backend applications that name it
(`raystack.app:build_backend`, `router:` its name) make one service, assembled here as a RaystackConfig
so that everything checked across backends (config/rules.py, as the running router checks them too) is
checked before anything deploys: names, a model's backends agreeing on it, the key variable withheld from
every backend. Here too: a backend application is named `<router>.<model>.<backend>`
(config.backend_app_name, as run_stack names it), and is not exposed over HTTP (its route prefix must be
null: the router is the only way in, with its keys and limits).

Serve's proxy ends a request at `http_options.request_timeout_s` silently: a stream just stops, with no
error event and no `data: [DONE]`. The router's own bound (`router.request_timeout_s`) ends it with an
error event, so the proxy's must not be shorter for a router it reaches (one that listens itself,
router/listener.py, is past no proxy); config check refuses such a file, and build_router refuses to
deploy under such a proxy. A backend's drain bound must not be shorter either, or a redeploy cuts
answers the router would still relay.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from raystack.config import BackendApp, ConfigError, RaystackConfig, RouterConfig, backend_app_name, parse_args
from raystack.config.rules import backend_problems

if TYPE_CHECKING:
    from ray.serve.schema import ServeDeploySchema

BUILD_ROUTER = "raystack.app:build_router"
BUILD_BACKEND = "raystack.app:build_backend"
FORMER_BUILD_APP = "raystack.app:build_app"  # one application held the router and every backend
SPLIT_FORMAT = (f"{FORMER_BUILD_APP} (one application for the router and all backends) is replaced by a router "
                f"application ({BUILD_ROUTER}, args: the former router: block) and one application per backend "
                f"({BUILD_BACKEND}, args: model, backend), so that changing a backend redeploys it alone. See the "
                f"README's \"Deploy config\" and the files in deploy_configs/")


def proxy_timeout_problem(proxy_timeout_s: float | None, settings: RouterConfig) -> str | None:
    router = settings.request_timeout_s
    if proxy_timeout_s is None or proxy_timeout_s >= router:
        return None
    return (f"http_options.request_timeout_s ({proxy_timeout_s:g} s) is shorter than router.request_timeout_s "
            f"({router:g} s): Serve's proxy would cut longer answers silently, with no error event and no [DONE]. "
            f"Raise it to at least {router:g}, or leave it unset (the router bounds every request)")


def load_serve_config(path: str | Path) -> list[tuple[str, RaystackConfig]]:
    """Validate a Ray Serve YAML file; return (router application name, its service) for each router."""
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
        serve_config = ServeDeploySchema.model_validate(raw)  # Serve's defaults filled in
    except Exception as err:  # Ray's pydantic (v1 or v2 API) error; its text names the field
        raise ConfigError(f"{path}: not a valid Ray Serve config:\n{err}") from None

    routers: dict[str, RouterConfig] = {}
    backends: list[tuple[str, str, BackendApp]] = []  # (where, application name, args)
    for i, app in enumerate(raw.get("applications") or []):
        name, where = app.get("name", "default"), f"applications[{i}]"
        if app.get("import_path") == BUILD_ROUTER:
            routers[name] = parse_args(RouterConfig, app.get("args"), f"{where}.args")
        elif app.get("import_path") == FORMER_BUILD_APP:
            raise ConfigError(f"{path}: {where} ({name}): {SPLIT_FORMAT}")
        elif app.get("import_path") == BUILD_BACKEND:
            if app.get("route_prefix", "/") is not None:
                raise ConfigError(f"{path}: {where} ({name}): set route_prefix: null. A backend answers through its "
                                  f"router only (its keys and limits); Serve's default, /, would expose it over HTTP")
            backends.append((where, name, parse_args(BackendApp, app.get("args"), f"{where}.args")))
    if not routers:
        raise ConfigError(f"{path}: no application has import_path: {BUILD_ROUTER}")
    _check_ingress(path, serve_config, routers)
    for where, name, backend in backends:
        if backend.router not in routers:
            raise ConfigError(f"{path}: {where} ({name}): router: {backend.router} is not an application of this "
                              f"file; the routers here: {', '.join(routers)}")
    return [(name, _service(path, name, settings, [b for b in backends if b[2].router == name]))
            for name, settings in routers.items()]


def _check_ingress(path: Path, serve_config: ServeDeploySchema, routers: dict[str, RouterConfig]) -> None:
    """Each router that listens itself (router/listener.py) has a port of its own: two on one port would
    share its connections, whatever their route prefixes. One reached through Serve's proxy needs the proxy's
    timeout no shorter than its own."""
    http = serve_config.http_options.model_dump()
    proxy_location = serve_config.proxy_location.value
    takers: dict[int, str] = {}
    for name, router in routers.items():
        try:
            port = router.listening_port(http, proxy_location)
        except ValueError as err:
            raise ConfigError(f"{path}: router {name}: {err}") from None
        problem = proxy_timeout_problem(http.get("request_timeout_s"), router) if port is None else None
        if problem:
            raise ConfigError(f"{path}: {problem}")
        if port is not None and port in takers:
            raise ConfigError(f"{path}: routers {takers[port]} and {name} would both listen on port {port}: give "
                              f"each its own port (args: port:)")
        if port is not None:
            takers[port] = name


def _service(path: Path, name: str, router: RouterConfig,
             backends: list[tuple[str, str, BackendApp]]) -> RaystackConfig:
    """The service router application `name` and its backend applications make, or why it cannot work."""
    if not backends:
        raise ConfigError(f"{path}: no backend application names the router {name} (router: {name}, import_path: "
                          f"{BUILD_BACKEND})")
    for where, app_name, backend in backends:
        problems = backend_problems(router, backend.backend, backend.withheld_env)
        if problems:
            raise ConfigError(f"{path}: {where} ({app_name}): " + "; ".join(problems))
    try:
        service = RaystackConfig.assemble(router, [backend for _, _, backend in backends])
    except ValueError as err:
        raise ConfigError(f"{path}: router {name} and its backends: {err}") from None
    for where, app_name, backend in backends:
        expected = backend_app_name(name, backend.model.name, backend.backend.name)
        if app_name != expected:
            raise ConfigError(f"{path}: {where} ({app_name}): name this application {expected}, after its router, "
                              f"model and backend (<router>.<model>.<backend>), as run_stack names it")
    return service
