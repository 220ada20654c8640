"""The applications a service is deployed as: a backend application's `args` (BackendApp), a whole service
(RaystackConfig, a router and its models) and the names Serve knows them by."""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationInfo, field_validator, model_validator

from raystack.config import rules
from raystack.config.backend import Backend
from raystack.config.errors import parse_args
from raystack.config.model import Model, ModelFields
from raystack.config.router import DEFAULT_REQUEST_TIMEOUT_S, RouterConfig
from raystack.config.strict import Strict, require_unique

# The router's keys are in the environment of every Ray process of a node (exported before `raystack
# start`); a backend blanks them for its replicas, which never need them (BackendApp.withheld_env).
DEFAULT_KEYS_ENV = "RAYSTACK_API_KEYS"
DEFAULT_ROUTER_APP = "raystack"


def backend_app_name(router: str, model: str, backend: str) -> str:
    """The application a backend is deployed as: RaystackConfig.backend_apps names it so, and config check
    refuses a file that names it otherwise."""
    return f"{router}.{model}.{backend}"


def deployment_name(model: str, backend: str) -> str:
    """Serve deployment name of one model backend (shown in the Ray dashboard)."""
    return f"LLMServer-{model}-{backend}"


def _draining(backend: Backend, seconds: float) -> Backend:
    """`backend` as deployed: its own drain bound, else `seconds` (a copy; the given backend is left as is)."""
    if backend.graceful_shutdown_timeout_s is not None:
        return backend
    return backend.model_copy(update={"graceful_shutdown_timeout_s": seconds})


class _CacheFields(Strict):
    cache_dir: str | None = Field(
        None, description="where prepared and downloaded models live, the same path on every node "
        "(default: $RAYSTACK_CACHE_DIR or ~/.cache/raystack, as where `serve run` runs)"
    )
    cache_shared: bool = Field(
        False, description="cache_dir is one filesystem mounted on every node: a model is downloaded once, and "
        "every node a replica spans is checked to see it (default: each node downloads its own copy)"
    )


class BackendApp(_CacheFields):
    """`args` of raystack.app:build_backend: one backend of one model, a Serve application of its own."""

    router: str = Field(DEFAULT_ROUTER_APP, min_length=1,
                        description="name of the router application that serves this backend")
    model: ModelFields
    backend: Backend
    withheld_env: list[str] = Field(
        [DEFAULT_KEYS_ENV], description="environment variables blanked for this backend's replicas and all "
        "they start: at least the variable the router reads its API keys from (router api_keys.env)"
    )

    @field_validator("backend")
    @classmethod
    def _drain_bound(cls, backend: Backend) -> Backend:
        """A backend application cannot see its router: unset, its drain bound is the router's default."""
        return _draining(backend, DEFAULT_REQUEST_TIMEOUT_S)

    @model_validator(mode="after")
    def _a_model_this_backend_serves(self) -> BackendApp:
        self.as_model()
        return self

    def as_model(self) -> Model:
        return Model(**self.model.model_dump(), backends=[self.backend])


class RaystackConfig(_CacheFields):
    """A whole raystack service: the router and every model with its backends."""

    router: RouterConfig = RouterConfig()  # before models: their backends drain as long as it lets requests run
    models: list[Model] = Field(min_length=1)

    @field_validator("models")
    @classmethod
    def _unique_model_names(cls, models: list[Model]) -> list[Model]:
        require_unique("model names", [m.name for m in models])
        return models

    @field_validator("models")
    @classmethod
    def _drain_as_long_as_a_request_may_run(cls, models: list[Model], info: ValidationInfo) -> list[Model]:
        """Each backend as deployed: unset, its drain bound is its router's request_timeout_s."""
        router = info.data.get("router")
        if router is None:  # its own error is said
            return models
        return [model.model_copy(update={"backends": [_draining(b, router.request_timeout_s)
                                                      for b in model.backends]}) for model in models]

    @model_validator(mode="after")
    def _rules(self) -> RaystackConfig:
        rules.check_service(self.router, self.models, self.withheld_env)
        return self

    @property
    def withheld_env(self) -> list[str]:
        """What each backend application blanks: the variable of the router's keys."""
        keys = self.router.api_keys
        return [keys.env] if keys and keys.env else [DEFAULT_KEYS_ENV]

    def backend_apps(self, router: str = DEFAULT_ROUTER_APP) -> dict[str, BackendApp]:
        """Each backend as the application it is deployed as, by application name."""
        return {
            backend_app_name(router, model.name, backend.name): BackendApp(
                router=router, model=model.fields, backend=backend, withheld_env=self.withheld_env,
                cache_dir=self.cache_dir, cache_shared=self.cache_shared,
            )
            for model in self.models for backend in model.backends
        }

    @classmethod
    def assemble(cls, router: RouterConfig, backends: list[BackendApp]) -> RaystackConfig:
        """The service a router and its backend applications make, held to every rule (rules.py). A model's
        backends must agree on what the model is (its source and routing)."""
        fields: dict[str, ModelFields] = {}
        served_by: dict[str, list[Backend]] = {}
        for app in backends:
            rules.check_backend(router, app.model.name, app.backend, app.withheld_env)
            known = fields.setdefault(app.model.name, app.model)
            if known != app.model:
                raise ValueError(f"the backends of model {app.model.name} disagree on what it is: "
                                 f"{known.model_dump()} vs {app.model.model_dump()}; give each the same model: block")
            served_by.setdefault(app.model.name, []).append(app.backend)
        models = {name: Model(**fields[name].model_dump(), backends=served) for name, served in served_by.items()}
        cache = {(app.cache_dir, app.cache_shared) for app in backends}
        cache_dir, cache_shared = cache.pop() if len(cache) == 1 else (None, False)
        return cls(models=list(models.values()), router=router, cache_dir=cache_dir, cache_shared=cache_shared)


def parse_config(args: dict[str, Any] | None, where: str = "args") -> RaystackConfig:
    return parse_args(RaystackConfig, args, where)
