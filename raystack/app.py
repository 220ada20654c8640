"""The `import_path`s of a raystack Serve config: validate, then wire the deployments.

    build_router   the Router (ingress): the OpenAI endpoint; it finds its backends at run time
    build_backend  one model backend: an LLMServer deployment, an application of its own (config.py says why)

Everything that can be checked before Ray schedules anything is checked here, so a bad config or a
missing model fails `serve run` at once with the field and the fix, not in a replica restart loop.
run_stack deploys a whole RaystackConfig with Serve's Python API, as the YAML file's applications would.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ray.serve import Application
from ray.serve.config import BackpressureConfig, RequestRouterConfig

from raystack.cluster.hbm_need import HBMNeeds, hbm_needs, unknown_needs
from raystack.cluster.placement import backend_demand, cluster_capacity, fit_problem, ray_placement
from raystack.config import (
    DEFAULT_ROUTER_APP,
    Adapter,
    Backend,
    BackendApp,
    ConfigError,
    Model,
    Parallelism,
    RaystackConfig,
    RouterConfig,
    Routing,
    deployment_name,
    parse_args,
    parse_config,
)
from raystack.models import adapters, embedded, sources
from raystack.process import SERVE_FAST_PATH_ENV
from raystack.serve_file import SPLIT_FORMAT, proxy_timeout_problem
from raystack.replica.server import LLMServer
from raystack.router.auth import APIKeyError, APIKeys
from raystack.router.catalogue import REGISTRATION, registered_backends, serve_details
from raystack.router.forwarding import BUSY_RETRY_AFTER_S
from raystack.router.ingress import Router

ENGINE_START_ATTEMPTS = 3
BACKEND_REQUEST_ROUTER = "raystack.router.replica_choice:BackendRequestRouter"
HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray's, on the head node only
# A replica being stopped (rolling update, scale-down, delete) sleeps this long before it first counts its
# ongoing requests, and again between counts (ray/serve/_private/replica.py _drain_ongoing_requests). Serve's
# 2 s kept an idle replica, and its NPUs, up to 2 s longer than needed. A request that a stale handle still
# sends it is rejected and Serve's router retries it on another replica (replica.py _is_replica_quiescing),
# so counting sooner loses nothing.
DRAIN_CHECK_S = 0.5


def check_deployable(models: list[Model], cache_dir: Path, hbm: HBMNeeds | None = None) -> None:
    """Fail fast on what the config names but this machine can tell is wrong, an NPU backend whose HBM need
    is unknown (`hbm`, from cluster/hbm_need.py) included."""
    problems = []
    for model in models:
        source_problems = _check_source(model, f"model {model.name}: source") if model.loads_model else []
        problems += source_problems  # all-synthetic models read no source
        problems += [problem for i, adapter in enumerate(model.adapters)
                     for problem in _check_adapter(adapter, f"model {model.name}: adapters[{i}].source")]
        for backend in model.backends:
            problems += backend.spec.check_deployable(backend, f"{model.name}@{backend.name}")
        if not source_problems:  # a missing model is said once, not again as an unknown HBM need
            problems += unknown_needs([model], hbm or {})
    problems += _check_capacity(models, hbm or {})
    if problems:
        raise ConfigError("raystack cannot deploy this config:\n" + "\n".join(problems))


def check_serve_ingress(router: RouterConfig) -> int | None:
    """Under a running Serve (as `serve run FILE` starts it): the port the router's replicas will listen on
    themselves (router/listener.py), None when Serve's proxy reaches them; and what cannot work refused: a
    router on the proxy's own port, or reached through a proxy whose timeout is shorter than the router's
    (serve_file.py says why)."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        details = serve_details()
    except ValueError:  # Serve not started yet: it will start with its defaults (a proxy, no timeout)
        return None
    http = details.get("http_options") or {}
    try:
        port = router.listening_port(http, details.get("proxy_location"))
    except ValueError as err:
        raise ConfigError(f"raystack cannot deploy this config: {err}") from None
    problem = proxy_timeout_problem(http.get("request_timeout_s"), router) if port is None else None
    if problem:
        raise ConfigError(f"raystack cannot deploy this config: {problem}")
    return port


def check_head_holds(router: RouterConfig) -> None:
    """A router that listens itself runs on the head node (build_router): one whose CPUs cannot hold its
    replicas would wait there unscheduled, and `serve run` with it."""
    import ray

    need = router.cpus * router.num_replicas
    head = next((n for n in ray.nodes() if n.get("Alive") and HEAD_NODE_RESOURCE in n.get("Resources", {})), None)
    has = (head or {}).get("Resources", {}).get("CPU", 0)
    if head is not None and has < need:
        raise ConfigError(
            f"raystack cannot deploy this config: the router takes requests itself on the head node (one hop), "
            f"and its {router.num_replicas} replica(s) reserve {need:g} CPU there, but the head has {has:g}. Set "
            f"router.cpus: 0 (Serve's proxy, which it replaces, reserves none), start the head with CPUs, or keep "
            f"Serve's proxy (proxy_location: EveryNode) and the router anywhere")


def load_api_keys(router: RouterConfig) -> APIKeys | None:
    """The router's keys, read where the app is built (a node of the cluster, not whoever runs config
    check) and handed to the router as digests: no replica ever holds a key itself."""
    if router.api_keys is None:
        return None
    try:
        return APIKeys.load(router.api_keys.env, router.api_keys.file, router.priority.names)
    except APIKeyError as err:
        raise ConfigError(str(err)) from None


def check_api_keys(config: RaystackConfig) -> None:
    """The router's keys, where this machine has them (they live on the cluster's nodes): every entry
    well-formed and every model a key names served. Elsewhere they are checked where the app is built."""
    source = config.router.api_keys
    if source is None or not (os.environ.get(source.env) if source.env else Path(source.file).expanduser().is_file()):
        return
    try:
        APIKeys.load_for([m.name for m in config.models], source.env, source.file, config.router.priority.names)
    except APIKeyError as err:
        raise ConfigError(f"router.api_keys: {err}") from None


def _check_source(model: Model, where: str) -> list[str]:
    try:
        src = sources.parse_source(model.source)
        if src.kind == "local":
            sources.check_local_dir(Path(src.ref), model.name, ("config.json",))  # not an adapter's directory
        elif src.kind == "embedded":
            embedded.gguf_path(embedded.EMBEDDED_MODELS[src.ref])
    except (sources.ModelSourceError, embedded.EmbeddedModelError) as err:
        return [f"  {where}: {err}"]
    return []


def _check_adapter(adapter: Adapter, where: str) -> list[str]:
    """A local adapter is checked here, as a local model is; a hub one where a replica fetches it."""
    src = sources.parse_source(adapter.source)
    if src.kind == "local" and not (Path(src.ref) / adapters.CONFIG_FILE).is_file():
        return [f"  {where}: {src.ref} has no {adapters.CONFIG_FILE}; point it at a PEFT LoRA adapter's directory "
                f"(what PEFT's save_pretrained writes)"]
    return []


def _check_capacity(models: list[Model], hbm: HBMNeeds) -> list[str]:
    """When connected to a cluster (as `serve run` is), refuse backends it can never host."""
    import ray

    if not ray.is_initialized():
        return []
    nodes = cluster_capacity()
    problems = []
    for model in models:
        for backend in model.backends:
            need = hbm.get((model.name, backend.name))
            demand = backend_demand(backend, need.gib if need else None)
            never, not_now = fit_problem(f"{model.name}@{backend.name}", demand, nodes)
            if never:
                problems.append(f"  {never}")
            elif not_now:
                print(f"raystack: {not_now}")
    return problems


def resolve_parallelism(models: list[Model], cache_dir: Path) -> None:
    """Replace `parallelism: auto` with the smallest tensor x pipeline that fits (raystack estimate)."""
    for model in models:
        for backend in model.backends:
            if not backend.sizes_itself:  # sized already, or on cpu: one engine per replica
                continue
            from raystack.cluster.estimate import EstimateError, estimate_source

            try:
                size = estimate_source(
                    model.source, cache_dir, npu_type=backend.accelerator.type,
                    max_model_len=backend.max_model_len, dtype=backend.engine_args.get("dtype"),
                    # the engine's own share of HBM (vLLM: gpu_memory_utilization, MindIE: npu_memory_fraction)
                    gpu_memory_utilization=backend.spec.memory_fraction(backend),
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
                       withheld_env: tuple[str, ...] = (), registration: BackendApp | None = None) -> dict[str, Any]:
    """Ray Serve options of one backend's LLMServer deployment: resources, scaling, routing, health.
    `withheld_env`: variables blanked in the replica's environment, and so in everything it starts (its
    engine processes and daemons; Ray actors it creates, such as vLLM's workers, inherit the runtime_env).
    `registration`: the backend as its router reads it from Serve's controller (router/catalogue.py)."""
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
        "graceful_shutdown_wait_loop_s": DRAIN_CHECK_S,
        # Not Serve's line per handle call: the router's access log has one per request, naming the replica.
        # Serve's went to stderr (RAY_SERVE_LOG_TO_STDERR) a line at a time, and on through Ray's log monitor.
        "logging_config": {"enable_access_log": False},
        "ray_actor_options": actor,
    }
    if backend.graceful_shutdown_timeout_s is not None:  # None only outside a whole config (tests)
        options["graceful_shutdown_timeout_s"] = backend.graceful_shutdown_timeout_s
    if registration is not None:
        options["user_config"] = {REGISTRATION: registration.model_dump(mode="json")}
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


def build_backend(args: dict[str, Any]) -> Application:
    """One model backend (config.BackendApp): its LLMServer deployment, which its router finds."""
    app = parse_args(BackendApp, args)
    model = app.as_model()
    cache_dir = sources.cache_root(app.cache_dir)
    resolve_parallelism([model], cache_dir)
    hbm = hbm_needs([model], cache_dir)
    check_deployable([model], cache_dir, hbm)
    if model.loads_model and sources.parse_source(model.source).kind == "embedded":
        sources.resolve(model.source, cache_dir, progress=print)  # offline, in seconds: here, visibly
    backend = app.backend
    need = hbm.get((model.name, backend.name))
    options = deployment_options(backend, model.routing, need.gib if need else None,
                                 tuple(app.withheld_env), registration=app)
    deployment = LLMServer.options(name=deployment_name(model.name, backend.name), **options)
    return deployment.bind(model.name, model.source, backend.model_dump(), str(cache_dir), app.cache_shared,
                           [adapter.model_dump() for adapter in model.adapters],
                           kv_events=model.routing.policy == "kv_aware")


def build_app(args: dict[str, Any]) -> Application:
    """The former import_path: a file written for it fails `serve run` with what to write instead."""
    raise ConfigError(SPLIT_FORMAT)


def build_router(args: dict[str, Any]) -> Application:
    """The Router (config.RouterConfig): the endpoint of every backend application that names it."""
    settings = parse_args(RouterConfig, args)
    listens = check_serve_ingress(settings) is not None
    if listens:
        check_head_holds(settings)
    api_keys = load_api_keys(settings)
    # The API keys' variable is in the environment of every Ray process of the node (exported before
    # `raystack start`): blanked for the replicas, which were handed the digests.
    secrets = (settings.api_keys.env,) if settings.api_keys and settings.api_keys.env else ()
    router = Router.options(
        num_replicas=settings.num_replicas,
        max_ongoing_requests=settings.max_ongoing_requests,
        max_queued_requests=settings.max_queued_requests,
        # A router replica being replaced (any change to its own args) relays its streams to their end first.
        graceful_shutdown_timeout_s=settings.request_timeout_s,
        graceful_shutdown_wait_loop_s=DRAIN_CHECK_S,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=BUSY_RETRY_AFTER_S),
        # Reached through Serve's proxy, Serve would log each request here too: the router's access log has it.
        logging_config={"enable_access_log": False},
        ray_actor_options={"num_cpus": settings.cpus,
                           # Listening itself, the router is where clients connect: the head node, as
                           # Serve's proxy with proxy_location: HeadOnly.
                           **({"resources": {HEAD_NODE_RESOURCE: 0.001}} if listens else {}),
                           "runtime_env": {"env_vars": {**SERVE_FAST_PATH_ENV, **dict.fromkeys(secrets, "")}}},
    )
    return router.bind(settings.model_dump(), api_keys)


def run_stack(args: dict[str, Any], name: str = DEFAULT_ROUTER_APP, route_prefix: str | None = "/",
              wait: bool = True) -> None:
    """Deploy a whole RaystackConfig with Serve's Python API: one application per backend (named by
    config.backend_app_name), then the router as `name` under `route_prefix`; backend applications of
    this router that the config no longer has are deleted, as `serve deploy` would. `wait`: until all run."""
    from ray import serve
    from ray.serve.context import _get_global_client

    config = parse_config(args)
    apps = config.backend_apps(name)
    targets = [serve.RunTarget(build_backend(app.model_dump(mode="json")), name=app_name, route_prefix=None)
               for app_name, app in apps.items()]
    targets.append(serve.RunTarget(build_router(config.router.model_dump(mode="json")), name=name,
                                   route_prefix=route_prefix))
    serve.run_many(targets, wait_for_ingress_deployment_creation=wait, wait_for_applications_running=wait)
    gone = [backend.app for backend in registered_backends(serve_details(), name) if backend.app not in apps]
    if gone:
        _get_global_client().delete_apps(gone, blocking=True)


def delete_stack(name: str = DEFAULT_ROUTER_APP) -> None:
    """Delete the router application `name` and every backend application that names it, all at once
    (each waits out its replicas' graceful shutdown; one after the other, the waits would add up)."""
    from ray.serve.context import _get_global_client

    backends = [backend.app for backend in registered_backends(serve_details(), name)]
    _get_global_client().delete_apps([name, *backends], blocking=True)
