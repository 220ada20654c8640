"""build_app: the `import_path` of a raystack Serve config. Validates, then wires the deployments.

    Router (ingress)  ->  LLMServer-<model>-<backend>  (one deployment per model backend)

Everything that can be checked before Ray schedules anything is checked here, so a bad config or a
missing model fails `serve run` at once with the field and the fix, not in a replica restart loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.serve import Application
from ray.serve.config import BackpressureConfig, RequestRouterConfig

from raystack.cluster.placement import (
    HBMNeeds,
    backend_demand,
    cluster_capacity,
    fit_problem,
    hbm_needs,
    ray_placement,
)
from raystack.config import (
    Backend,
    ConfigError,
    Model,
    Parallelism,
    RaystackConfig,
    Routing,
    deployment_name,
    parse_config,
)
from raystack.models import embedded, sources
from raystack.process import SERVE_FAST_PATH_ENV
from raystack.serve_file import proxy_timeout_problem
from raystack.serving.auth import APIKeyError, APIKeys
from raystack.serving.forwarding import BUSY_RETRY_AFTER_S
from raystack.serving.ingress import Router
from raystack.serving.server import LLMServer

ENGINE_START_ATTEMPTS = 3
BACKEND_REQUEST_ROUTER = "raystack.serving.replica_choice:BackendRequestRouter"


def check_deployable(config: RaystackConfig, cache_dir: Path, hbm: HBMNeeds | None = None) -> None:
    """Fail fast on what the config names but this machine can tell is wrong."""
    problems = []
    for i, model in enumerate(config.models):
        where = f"models[{i}]"
        if model.loads_model:  # all-synthetic models read no source
            problems += _check_source(model, f"{where}.source")
        for j, backend in enumerate(model.backends):
            problems += backend.spec.check_deployable(backend, f"{where}.backends[{j}]")
    problems += _check_capacity(config, hbm or {})
    if problems:
        raise ConfigError("raystack cannot deploy this config:\n" + "\n".join(problems))


def check_proxy_timeout(config: RaystackConfig) -> None:
    """Under a running Serve (as `serve run FILE` starts it), its proxy's timeout must not be shorter than the
    router's (serve_file.py says why)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    if not ray.is_initialized():
        return
    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:  # Serve not started yet: it will start with its defaults (no proxy timeout)
        return
    problem = proxy_timeout_problem(ray.get(controller.get_http_config.remote(), timeout=60).request_timeout_s, config)
    if problem:
        raise ConfigError(f"raystack cannot deploy this config: {problem}")


def load_api_keys(config: RaystackConfig) -> APIKeys | None:
    """The router's keys, read where the app is built (a node of the cluster, not whoever runs config
    check) and handed to the router as digests: no replica ever holds a key itself."""
    if config.router.api_keys is None:
        return None
    try:
        return APIKeys.load(config.router.api_keys.env, config.router.api_keys.file)
    except APIKeyError as err:
        raise ConfigError(str(err)) from None


def _check_source(model: Model, where: str) -> list[str]:
    try:
        src = sources.parse_source(model.source)
        if src.kind == "local":
            sources.check_local_dir(Path(src.ref), model.name)
        elif src.kind == "embedded":
            embedded.gguf_path(embedded.EMBEDDED_MODELS[src.ref])
    except (sources.ModelSourceError, embedded.EmbeddedModelError) as err:
        return [f"  {where}: {err}"]
    return []


def _check_capacity(config: RaystackConfig, hbm: HBMNeeds) -> list[str]:
    """When connected to a cluster (as `serve run` is), refuse backends it can never host."""
    import ray

    if not ray.is_initialized():
        return []
    nodes = cluster_capacity()
    problems = []
    for i, model in enumerate(config.models):
        for j, backend in enumerate(model.backends):
            demand = backend_demand(backend, hbm.get((model.name, backend.name)))
            never, not_now = fit_problem(f"{model.name}@{backend.name}", demand, nodes)
            if never:
                problems.append(f"  models[{i}].backends[{j}]: {never}")
            elif not_now:
                print(f"raystack: {not_now}")
    return problems


def resolve_parallelism(config: RaystackConfig, cache_dir: Path) -> None:
    """Replace `parallelism: auto` with the smallest tensor x pipeline that fits (raystack estimate)."""
    for model in config.models:
        for backend in model.backends:
            if backend.parallelism != "auto":
                continue
            from raystack.cluster.estimate import EstimateError, estimate_source

            try:
                size = estimate_source(
                    model.source, cache_dir, npu_type=backend.accelerator.type,
                    max_model_len=backend.max_model_len, dtype=backend.engine_args.get("dtype"),
                    gpu_memory_utilization=backend.engine_args.get("gpu_memory_utilization", 0.9),
                )
            except (EstimateError, sources.ModelSourceError) as err:
                raise ConfigError(
                    f"parallelism: auto for {model.name}@{backend.name} could not size the model: {err}. "
                    f"Set parallelism: {{tensor: T, pipeline: P}} explicitly."
                ) from None
            backend.parallelism = Parallelism(tensor=size.tensor_parallel, pipeline=size.pipeline_parallel)
            print(f"raystack: {model.name}@{backend.name}: parallelism auto -> tensor {size.tensor_parallel} "
                  f"x pipeline {size.pipeline_parallel} ({size.required_gib:.0f} GiB on {size.npu_type})")


def deployment_options(backend: Backend, routing: Routing = Routing(), min_hbm_gib: float | None = None,
                       withheld_env: tuple[str, ...] = ()) -> dict[str, Any]:
    """Ray Serve options of one backend's LLMServer deployment: resources, scaling, routing, health.
    `withheld_env`: variables blanked in the replica's environment, and so in everything it starts (its
    engine processes and daemons; Ray actors it creates, such as vLLM's workers, inherit the runtime_env)."""
    actor: dict[str, Any] = {
        "num_cpus": backend.replica_cpus,
        "runtime_env": {"env_vars": {**SERVE_FAST_PATH_ENV, **backend.env, **dict.fromkeys(withheld_env, "")}},
    }
    options: dict[str, Any] = {
        "autoscaling_config": backend.autoscaling.to_serve(),
        "max_ongoing_requests": backend.max_ongoing_requests,
        # Bounded: beyond it the router answers 429 + Retry-After instead of queueing without end.
        "max_queued_requests": backend.max_queued_requests,
        "request_router_config": RequestRouterConfig(
            request_router_class=BACKEND_REQUEST_ROUTER,
            request_router_kwargs=routing.model_dump(),
        ),
        "health_check_period_s": backend.health_check_period_s,
        "health_check_timeout_s": backend.health_check_timeout_s,
        # A replica that cannot start (download impossible offline, out of memory) fails the same way
        # every time: give up after a few attempts so `serve status` shows the error, not a retry loop.
        "max_constructor_retry_count": ENGINE_START_ATTEMPTS,
        "ray_actor_options": actor,
    }
    if backend.graceful_shutdown_timeout_s is not None:  # None only outside a whole config (tests)
        options["graceful_shutdown_timeout_s"] = backend.graceful_shutdown_timeout_s
    placement = ray_placement(backend, min_hbm_gib)
    if placement.replica:
        actor["resources"] = placement.replica
    if placement.label_selector:  # on the replica too, where `raystack status` reads it back
        actor["label_selector"] = placement.label_selector
    if placement.bundles:
        options["placement_group_bundles"] = list(placement.bundles)
        options["placement_group_strategy"] = placement.strategy
        if placement.label_selector:  # one selector: Serve applies it to every bundle
            options["placement_group_bundle_label_selector"] = [placement.label_selector]
    return options


def build_app(args: dict[str, Any]) -> Application:
    config = parse_config(args)
    cache_dir = sources.cache_root(config.cache_dir)
    resolve_parallelism(config, cache_dir)
    hbm = hbm_needs(config, cache_dir)
    check_deployable(config, cache_dir, hbm)
    check_proxy_timeout(config)
    api_keys = load_api_keys(config)
    for model in config.models:  # embedded models prepare offline in seconds: do it here, visibly
        if model.loads_model and sources.parse_source(model.source).kind == "embedded":
            sources.resolve(model.source, cache_dir, progress=print)

    # The API keys' variable is in the environment of every Ray process of the node (exported before
    # `raystack start`): blanked for the replicas, which never need it.
    secrets = (config.router.api_keys.env,) if config.router.api_keys and config.router.api_keys.env else ()
    backends: dict[str, dict[str, Application]] = {}
    for model in config.models:
        for backend in model.backends:
            options = deployment_options(backend, model.routing, hbm.get((model.name, backend.name)), secrets)
            deployment = LLMServer.options(name=deployment_name(model.name, backend.name), **options)
            backends.setdefault(model.name, {})[backend.name] = deployment.bind(
                model.name, model.source, backend.model_dump(), str(cache_dir), config.cache_shared
            )
    router = Router.options(
        num_replicas=config.router.num_replicas,
        max_ongoing_requests=config.router.max_ongoing_requests,
        max_queued_requests=config.router.max_queued_requests,
        # A router replica being replaced (any redeploy) relays its streams to their end first.
        graceful_shutdown_timeout_s=config.router.request_timeout_s,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=BUSY_RETRY_AFTER_S),
        ray_actor_options={"num_cpus": config.router.cpus,
                           "runtime_env": {"env_vars": {**SERVE_FAST_PATH_ENV, **dict.fromkeys(secrets, "")}}},
    )
    return router.bind(config.model_dump(), backends, api_keys)
