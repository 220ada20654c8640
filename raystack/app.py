"""build_app: the `import_path` of a raystack Serve config. Validates, then wires the deployments.

    Router (ingress)  ->  LLMServer-<model>-<backend>  (one deployment per model backend)

Everything that can be checked before Ray schedules anything is checked here, so a bad config or a
missing model fails `serve run` at once with the field and the fix, not in a replica restart loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from raystack.cluster.placement import backend_demand, cluster_capacity, fit_problem, ray_strategy
from raystack.config import (
    MINDIE_NODE_CPUS,
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
from raystack.serving.fast_path import SERVE_FAST_PATH_ENV
from raystack.serving.router import Router
from raystack.serving.server import LLMServer

ENGINE_START_ATTEMPTS = 3
BACKEND_REQUEST_ROUTER = "raystack.serving.request_router:BackendRequestRouter"


def cache_dir_of(config: RaystackConfig) -> Path:
    return Path(config.cache_dir).expanduser() if config.cache_dir else sources.default_cache_dir()


def check_deployable(config: RaystackConfig, cache_dir: Path) -> None:
    """Fail fast on what the config names but this machine can tell is wrong."""
    problems = []
    for i, model in enumerate(config.models):
        where = f"models[{i}]"
        if model.loads_model:  # all-synthetic models read no source
            problems += _check_source(model, f"{where}.source")
        for j, backend in enumerate(model.backends):
            if backend.engine == "vllm":
                problems += _check_vllm_args(backend, f"{where}.backends[{j}].engine_args")
    problems += _check_capacity(config)
    if problems:
        raise ConfigError("raystack cannot deploy this config:\n" + "\n".join(problems))


def check_api_keys(config: RaystackConfig) -> None:
    """The key source must yield keys where the app is built (the cluster), not on whoever runs config check."""
    if config.router.api_keys is None:
        return
    from raystack.serving.auth import APIKeyError, APIKeys

    try:
        APIKeys.load(config.router.api_keys.env, config.router.api_keys.file)
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


def _check_capacity(config: RaystackConfig) -> list[str]:
    """When connected to a cluster (as `serve run` is), refuse backends it can never host."""
    import ray

    if not ray.is_initialized():
        return []
    nodes = cluster_capacity()
    problems = []
    for i, model in enumerate(config.models):
        for j, backend in enumerate(model.backends):
            never, not_now = fit_problem(f"{model.name}@{backend.name}", backend_demand(backend), nodes)
            if never:
                problems.append(f"  models[{i}].backends[{j}]: {never}")
            elif not_now:
                print(f"raystack: {not_now}")
    return problems


def _check_vllm_args(backend: Backend, where: str) -> list[str]:
    from raystack.engines.vllm import EngineArgsError, check_engine_args

    try:
        check_engine_args(backend.engine_args, where)
    except ImportError:  # vLLM lives only on the engine nodes: the replica checks instead
        return []
    except EngineArgsError as err:
        return [str(err)]
    return []


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


def deployment_options(backend: Backend, routing: Routing = Routing()) -> dict[str, Any]:
    """Ray Serve options of one backend's LLMServer deployment: resources, scaling, routing, health."""
    actor: dict[str, Any] = {
        "num_cpus": backend.replica_cpus,
        "runtime_env": {"env_vars": {**SERVE_FAST_PATH_ENV, **backend.env}},
    }
    options: dict[str, Any] = {
        "autoscaling_config": backend.autoscaling.to_serve(),
        "max_ongoing_requests": backend.max_ongoing_requests,
        # Bounded: beyond it the router answers 429 + Retry-After instead of queueing without end.
        "max_queued_requests": backend.max_queued_requests,
        "request_router_config": RequestRouterConfig(
            request_router_class=BACKEND_REQUEST_ROUTER,
            request_router_kwargs={"policy": routing.policy, "affinity_slack": routing.affinity_slack},
        ),
        "health_check_period_s": backend.health_check_period_s,
        "health_check_timeout_s": backend.health_check_timeout_s,
        "graceful_shutdown_timeout_s": backend.graceful_shutdown_timeout_s,
        # A replica that cannot start (download impossible offline, out of memory) fails the same way
        # every time: give up after a few attempts so `serve status` shows the error, not a retry loop.
        "max_constructor_retry_count": ENGINE_START_ATTEMPTS,
        "ray_actor_options": actor,
    }
    if backend.device == "npu":
        npus = backend.parallel.world_size
        accel = {f"accelerator_type:{backend.accelerator.type}": 0.001} if backend.accelerator.type else {}
        if backend.engine == "mindie":
            options.update(mindie_placement(backend, actor, accel))
        elif npus == 1:
            actor["resources"] = {"NPU": 1, **accel}
        else:
            # Bundle 0 holds the replica and its first NPU; the engine's workers take the rest.
            options["placement_group_bundles"] = [
                {"CPU": backend.replica_cpus, "NPU": 1, **accel}
            ] + [{"NPU": 1, **accel} for _ in range(npus - 1)]
            options["placement_group_strategy"] = ray_strategy(backend)
    return options


def mindie_placement(backend: Backend, actor: dict[str, Any], accel: dict[str, float]) -> dict[str, Any]:
    """A MindIE replica holds all of its node's NPUs itself (its daemon is one process over them): tensor
    NPUs per node, on `pipeline` nodes. Beyond one node, each further node is a bundle of its own where
    a MindIENode actor runs that node's daemon; STRICT_SPREAD, since two daemons of one replica cannot
    share a host."""
    per_node = backend.parallel.tensor
    actor["resources"] = {"NPU": per_node, **accel}
    if backend.parallel.pipeline == 1:
        return {}
    return {
        "placement_group_bundles": [{"CPU": backend.replica_cpus, "NPU": per_node, **accel}]
        + [{"CPU": MINDIE_NODE_CPUS, "NPU": per_node, **accel} for _ in range(backend.parallel.pipeline - 1)],
        "placement_group_strategy": "STRICT_SPREAD",
    }


def build_app(args: dict[str, Any]) -> Application:
    config = parse_config(args)
    cache_dir = cache_dir_of(config)
    resolve_parallelism(config, cache_dir)
    check_deployable(config, cache_dir)
    check_api_keys(config)
    for model in config.models:  # embedded models prepare offline in seconds: do it here, visibly
        if model.loads_model and sources.parse_source(model.source).kind == "embedded":
            sources.resolve(model.source, cache_dir, progress=print)

    backends: dict[str, dict[str, Application]] = {}
    for model in config.models:
        for backend in model.backends:
            deployment = LLMServer.options(
                name=deployment_name(model.name, backend.name), **deployment_options(backend, model.routing)
            )
            backends.setdefault(model.name, {})[backend.name] = deployment.bind(
                model.name, model.source, backend.model_dump(), str(cache_dir)
            )
    router = Router.options(
        num_replicas=config.router.num_replicas,
        max_ongoing_requests=config.router.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.router.cpus, "runtime_env": {"env_vars": SERVE_FAST_PATH_ENV}},
    )
    return router.bind(config.model_dump(), backends)
