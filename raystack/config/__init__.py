"""The deploy config: pydantic models of the `args` blocks of a Ray Serve YAML file.

    applications:
      - name: raystack                            # the router: the OpenAI endpoint
        route_prefix: /
        import_path: raystack.app:build_router
        args: {api_keys: ..., num_replicas: 2}    # <- RouterConfig
      - name: raystack.qwen3-32b.vllm             # one application per model backend: <router>.<model>.<backend>
        route_prefix: null
        import_path: raystack.app:build_backend
        args: {model: {name: ..., source: ...}, backend: {name: vllm, ...}}   # <- BackendApp

Serve versions every deployment of an application by the application's args, so each backend is an
application of its own: changing one redeploys it alone, not the router or the other backends. The router
finds its backends at run time (router/catalogue.py). RaystackConfig is the whole of it, a router and its
models, as `raystack config check` assembles it from a file and `raystack.app.run_stack` splits it.

Every model is strict: an unknown key is an error that names its path (`backend.foo`). By concern:

    strict.py   the strict base model, the name pattern, unique names
    errors.py   ConfigError, a pydantic error said by path, parse_args
    backend.py  Backend (each engine's settings block from the registry), Parallelism, Accelerator, ...
    model.py    Model, ModelFields, Routing, Adapter
    router.py   RouterConfig, APIKeySource
    rules.py    the rules a router and its backends satisfy together
    service.py  BackendApp, RaystackConfig, application and deployment names, parse_config
"""

from raystack.config.backend import Accelerator, Autoscaling, Backend, Parallelism, Resources
from raystack.config.errors import ConfigError, format_validation_error, parse_args
from raystack.config.model import Adapter, Model, ModelFields, Routing
from raystack.config.router import APIKeySource, RouterConfig
from raystack.config.service import (
    DEFAULT_KEYS_ENV,
    DEFAULT_ROUTER_APP,
    BackendApp,
    RaystackConfig,
    backend_app_name,
    deployment_name,
    parse_config,
)
from raystack.config.strict import NAME_PATTERN

__all__ = [
    "APIKeySource", "Accelerator", "Adapter", "Autoscaling", "Backend", "BackendApp", "ConfigError",
    "DEFAULT_KEYS_ENV", "DEFAULT_ROUTER_APP", "Model", "ModelFields", "NAME_PATTERN", "Parallelism",
    "RaystackConfig", "Resources", "RouterConfig", "Routing", "backend_app_name", "deployment_name",
    "format_validation_error", "parse_args", "parse_config",
]
