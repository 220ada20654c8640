"""The deploy config: pydantic models of the `args` blocks of a Ray Serve YAML file.

    applications:
      - name: raystack                            # the router: the OpenAI endpoint
        route_prefix: /
        import_path: raystack.app:build_router
        args: {api_keys: ..., num_replicas: 2}    # <- RouterConfig
      - name: qwen3-32b.vllm                      # one application per model backend
        route_prefix: null
        import_path: raystack.app:build_backend
        args: {model: {name: ..., source: ...}, backend: {name: vllm, ...}}   # <- BackendApp

Serve versions every deployment of an application by the application's args, so each backend is an
application of its own: changing one redeploys it alone, not the router or the other backends. The router
finds its backends at run time (router/catalogue.py). RaystackConfig is the whole of it, a router and its
models, as `raystack config check` assembles it from a file and `raystack.app.run_stack` splits it.

Every model is strict: an unknown key is an error that names its path (`backend.foo`).
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from raystack.cluster.chips import FAMILIES, family_of, parse_chip
from raystack.engines.base import DEFAULT_ENGINE, EngineSpec, engine_spec, registry

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class ConfigError(ValueError):
    """A deploy config that cannot work; the message names the field and the fix."""


def _require_unique(what: str, names: list[str]) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{what} must be unique; repeated: {repeated}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Parallelism(_Strict):
    tensor: int = Field(1, ge=1, description="tensor-parallel size: NPUs per pipeline stage")
    pipeline: int = Field(1, ge=1, description="pipeline-parallel size: stages, usually one per node")

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline


class Accelerator(_Strict):
    type: str | None = Field(
        None, description="the NPUs a replica needs: a family (Ascend910B = every Atlas A2 part, Ascend910_93, "
        "Ascend310P) or a model (Ascend910B3, Ascend910B4-1); placed by the labels `raystack start` sets"
    )

    @field_validator("type")
    @classmethod
    def _known_type(cls, wanted: str | None) -> str | None:
        if wanted is None or family_of(wanted):
            return wanted
        chip = parse_chip(wanted)
        if chip is None or chip.model is None:
            raise ValueError(f"unknown NPU type {wanted!r}: name a family ({', '.join(FAMILIES)}) or a model "
                             f"(Ascend910B3, Ascend910B4, Ascend910B4-1, Ascend910_9392, Ascend310P3, ...)")
        return wanted


class Autoscaling(_Strict):
    """Ray Serve autoscaling for one backend. Defaults are explicit and do scale on load."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(
        8, gt=0, description="in-flight requests per replica that Serve aims for when scaling"
    )
    upscale_delay_s: float = Field(10, ge=0, description="load must stay above target this long to add replicas")
    downscale_delay_s: float = Field(120, ge=0, description="load must stay below target this long to remove replicas")
    downscale_to_zero_delay_s: float | None = Field(
        None, ge=0, description="with min_replicas 0: idle time before the last replica goes (default: downscale_delay_s)"
    )
    look_back_period_s: float = Field(30, gt=0, description="window the load is averaged over")
    metrics_interval_s: float = Field(10, gt=0, description="how often replicas and the router report load")

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is greater than max_replicas ({self.max_replicas})"
            )
        return self

    def to_serve(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class Resources(_Strict):
    cpus: float | None = Field(
        None,
        ge=0,
        description="CPUs Ray reserves for one replica (default: 1 on cpu, 2 on npu, 0.1 for engine: synthetic)",
    )


class _BackendFields(_Strict):
    """One engine serving a model: its deployment, placement and engine arguments. Each engine's own
    settings block (`mindie:`, `synthetic:`, ...) is added from the engine registry (Backend below)."""

    name: str = Field(pattern=NAME_PATTERN)
    engine: str = Field(DEFAULT_ENGINE, description=f"the inference engine: {' | '.join(registry())}")
    device: Literal["cpu", "npu"] = Field("npu", description="default: the engine's first device")
    accelerator: Accelerator = Accelerator()
    parallelism: Parallelism | Literal["auto"] = Field(
        Parallelism(), description="tensor/pipeline sizes, or `auto` to size from the model (raystack estimate)"
    )
    max_model_len: int | None = Field(
        None, ge=16, description="context length; default: the model's (or the engine's, for an engine without one)"
    )
    hbm_gib: float | None = Field(
        None, gt=0, description="HBM per NPU one replica needs, GiB (device: npu); when set it is used instead of "
        "the estimate from the model's config.json or checkpoint size, and selects NPUs with at least that much"
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="passed to the engine as-is (vLLM: AsyncEngineArgs fields)"
    )
    serving_args: dict[str, Any] = Field(
        default_factory=dict, description="passed to the engine's OpenAI serving layer as-is (vLLM: the options "
        "`vllm serve` takes beside engine arguments, its BaseFrontendArgs: tool_call_parser, chat_template, ...)"
    )
    env: dict[str, str] = Field(default_factory=dict, description="environment of the replica")
    resources: Resources = Resources()
    autoscaling: Autoscaling = Autoscaling()
    max_ongoing_requests: int = Field(
        64, ge=1, description="requests one replica takes at once; the engine batches them"
    )
    max_queued_requests: int = Field(
        128, ge=0, description="requests waiting for a replica (per router replica) once every replica is at "
        "max_ongoing_requests; beyond it clients get 429 with Retry-After"
    )
    weight: float = Field(1, ge=0, description="share of the model's requests under routing policy: weighted")
    adapters_per_replica: int = Field(
        4, ge=1, description="the model's LoRA adapters one replica holds loaded at once (Serve's model "
        "multiplexing: requests go to replicas that hold their adapter; another one replaces the least "
        "recently used); vLLM: also its max_loras, the adapters in one batch"
    )
    health_check_period_s: float = Field(10, gt=0)
    health_check_timeout_s: float = Field(30, gt=0)
    graceful_shutdown_timeout_s: float | None = Field(
        None, ge=0, description="how long a replica being replaced or scaled down may finish its requests "
        "before it is stopped (default: the router's default request_timeout_s, 3600, the longest a request may "
        "take, so a rolling update or a scale-down never cuts an answer; config check refuses less than the "
        "router's)"
    )

    @property
    def spec(self) -> EngineSpec:
        return engine_spec(self.engine)

    @property
    def loads_model(self) -> bool:
        """False for an engine that answers without model files (engine: synthetic)."""
        return self.spec.loads_model

    @property
    def replica_cpus(self) -> float:
        if self.resources.cpus is not None:
            return self.resources.cpus
        return self.spec.replica_cpus[self.device]

    @property
    def longest_answer_s(self) -> float:
        """The longest one answer may take, as this backend knows it: its drain bound. A backend application
        cannot see its router's args (serve_file.py assembles them for config check only), but its
        graceful_shutdown_timeout_s defaults to the router's request_timeout_s and config check refuses one
        shorter, so an engine that bounds answers itself (MindIE's timeouts) never cuts one the router allows."""
        if self.graceful_shutdown_timeout_s is not None:
            return self.graceful_shutdown_timeout_s
        return RouterConfig().request_timeout_s

    @property
    def parallel(self) -> Parallelism:
        """The resolved parallelism; build_backend resolves `auto` before anything reads it."""
        if self.parallelism == "auto":
            raise ValueError("parallelism: auto is resolved by build_backend (raystack.app.resolve_parallelism)")
        return self.parallelism

    @model_validator(mode="before")
    @classmethod
    def _placement_is_retired(cls, fields: Any) -> Any:
        """`placement: pack|strict_pack|spread` chose Ray's strategy; parallelism decides it now
        (engines/base.py rank_per_npu), since only one strategy keeps tensor-parallel groups whole."""
        if isinstance(fields, dict) and "placement" in fields:
            raise ValueError(
                "placement: is no longer set in the config; remove it. raystack keeps a replica with pipeline 1 "
                "on one node (Ray STRICT_PACK) and spans nodes only for pipeline > 1, each tensor-parallel group "
                "on one node (README: Placement)")
        return fields

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, engine: str) -> str:
        if engine not in registry():
            raise ValueError(f"unknown engine {engine!r}; the engines are: {', '.join(registry())}")
        return engine

    @model_validator(mode="after")
    def _engine_rules(self) -> _BackendFields:
        spec = self.spec
        for other in registry().values():
            if other.settings is not None and other.name != self.engine and getattr(self, other.name) is not None:
                raise ValueError(f"{other.name}: applies to engine: {other.name} only; remove it or set that engine")
        if "device" not in self.model_fields_set:
            self.device = spec.devices[0]
        if spec.settings is not None and getattr(self, spec.name) is None:
            setattr(self, spec.name, spec.settings())
        if self.max_model_len is None:
            self.max_model_len = spec.default_max_model_len
        if self.parallelism == "auto" and self.device == "cpu":
            self.parallelism = Parallelism()  # one CPU engine per replica: nothing to size
        if self.device == "cpu" and self.accelerator.type:
            raise ValueError("accelerator.type applies to device: npu only; remove it or set device: npu")
        if self.device == "cpu" and self.hbm_gib is not None:
            raise ValueError("hbm_gib applies to device: npu only; remove it or set device: npu")
        spec.validate(self)  # the engine's own rules (and messages) first
        if self.device not in spec.devices:
            raise ValueError(f"engine: {self.engine} runs on device: {' or '.join(spec.devices)} only")
        for field in ("engine_args", "serving_args"):
            if getattr(self, field) and not spec.takes_engine_args:
                takers = [e.name for e in registry().values() if e.takes_engine_args]
                raise ValueError(f"{field} apply to engine: {' or '.join(takers)} only; engine: {self.engine} is "
                                 f"set up by its {self.engine}: block")
        return self


# A backend with each registered engine's settings block as an optional field named after the engine.
Backend = create_model(
    "Backend",
    __base__=_BackendFields,
    __module__=__name__,
    **{spec.name: (spec.settings | None, Field(None, description=f"settings of engine: {spec.name}"))
       for spec in registry().values() if spec.settings is not None},
)


class Routing(_Strict):
    """How the router spreads one model's requests over its backends and their replicas."""

    policy: Literal["least_loaded", "prefix_affinity", "weighted"] = Field(
        "least_loaded",
        description="least_loaded: fewest in-flight requests (power-of-two sampling); prefix_affinity: the same "
        "prompt prefix to the same replica while its load stays within affinity_slack, else least_loaded; "
        "weighted: backends by their weight, replicas least_loaded",
    )
    prefix_chars: int = Field(
        2048, ge=64, description="prefix_affinity: how many leading characters of the prompt are matched"
    )
    affinity_slack: int = Field(
        4, ge=0, description="in-flight requests a preferred replica may carry beyond the least-loaded one "
        "before a request goes elsewhere: under prefix_affinity the replica that served the prefix; under "
        "every policy one that holds the request's LoRA adapter"
    )


class Adapter(_Strict):
    """A LoRA adapter of the model (raystack.models.adapters): clients send its name as `model`."""

    name: str = Field(pattern=NAME_PATTERN, description="the `model` clients send to be answered through it")
    source: str = Field(min_length=1, description="a PEFT LoRA directory (adapter_config.json and its weights): "
                        "a local path, modelscope://Org/Name or hf://Org/Name")

    @field_validator("source")
    @classmethod
    def _a_directory_or_hub(cls, source: str) -> str:
        from raystack.models.sources import ModelSourceError, parse_source

        try:
            kind = parse_source(source).kind
        except ModelSourceError as err:
            raise ValueError(str(err)) from None
        if kind == "embedded":
            raise ValueError(f"{source!r} is an embedded model, not an adapter; give the adapter's directory or "
                             f"hub repository")
        return source


class ModelFields(_Strict):
    """What a model is, whichever backends serve it."""

    name: str = Field(pattern=NAME_PATTERN, description="the `model` clients ask for")
    source: str | None = Field(
        None,
        min_length=1,
        description="embedded id, local path, modelscope://Org/Name or hf://Org/Name; "
        "may be left out when every backend is engine: synthetic",
    )
    routing: Routing = Routing()
    adapters: list[Adapter] = Field(
        default_factory=list, description="LoRA adapters of this model, served by its backends whose engine "
        "takes adapters; each replica loads those asked of it, up to its backend's adapters_per_replica"
    )

    @model_validator(mode="after")
    def _adapter_names(self) -> ModelFields:
        names = [a.name for a in self.adapters]
        _require_unique("adapter names", names)
        if self.name in names:
            raise ValueError(f"adapter {self.name!r} has the model's own name; clients could not ask for the model")
        return self


class Model(ModelFields):
    backends: list[Backend] = Field(min_length=1)

    @property
    def fields(self) -> ModelFields:
        return ModelFields.model_validate(self.model_dump(exclude={"backends"}))

    @property
    def context_limit(self) -> int | None:
        """The longest context any backend allows, when every backend sets max_model_len (else unknown here:
        the engines know their model's)."""
        lengths = [b.max_model_len for b in self.backends]
        return None if None in lengths else max(lengths)

    @property
    def loads_model(self) -> bool:
        """Whether any backend reads the model's files (all-synthetic models have none)."""
        return any(b.loads_model for b in self.backends)

    @field_validator("backends")
    @classmethod
    def _unique_backend_names(cls, backends: list[Backend]) -> list[Backend]:
        _require_unique("backend names within a model", [b.name for b in backends])
        return backends

    @model_validator(mode="after")
    def _names_the_engines_accept(self) -> Model:
        for backend in self.backends:
            backend.spec.check_model_name(self.name)
            for adapter in self.adapters if backend.spec.serves_adapters else ():
                backend.spec.check_adapter_name(adapter.name)
        return self

    @model_validator(mode="after")
    def _source_when_loaded(self) -> Model:
        if self.source is None and self.loads_model:
            loader = next(b for b in self.backends if b.loads_model)
            raise ValueError(
                f"source: required, because backend {loader.name!r} (engine: {loader.engine}) loads the model; "
                f"only a model whose backends are all engine: synthetic may leave it out"
            )
        return self


class APIKeySource(_Strict):
    """Where the router reads its API keys: one of an environment variable or a file (raystack.router.auth)."""

    env: str | None = Field(None, min_length=1, description="environment variable holding the keys")
    file: str | None = Field(None, min_length=1, description="file holding the keys, on every router node")

    @model_validator(mode="after")
    def _one_source(self) -> APIKeySource:
        if (self.env is None) == (self.file is None):
            raise ValueError("set exactly one of env: VARIABLE or file: PATH")
        return self


class RouterConfig(_Strict):
    cpus: float = Field(
        0.1, ge=0, description="CPUs Ray reserves per router replica; small so it always schedules"
    )
    num_replicas: int = Field(
        1, ge=1, description="router replicas; two or more on a cluster, so losing one cuts only its own streams"
    )
    max_ongoing_requests: int = Field(1024, ge=1, description="requests one router replica handles at once")
    max_queued_requests: int = Field(
        1024, ge=1, description="requests waiting for a router replica past max_ongoing_requests; beyond it "
        "clients get 429 with Retry-After (unbounded, a burst would queue in the proxy without end)"
    )
    first_token_timeout_s: float = Field(
        300, gt=0, description="longest wait for a request's first token (queueing, scale-up and prefill "
        "included): then 503 when no replica came up, else 504"
    )
    request_timeout_s: float = Field(
        3600, gt=0, description="longest a request may take in all; a stream past it ends with an error event"
    )
    retries: int = Field(
        2, ge=0, description="times a request is resent to another replica when one fails before the first token"
    )
    max_request_bytes: int = Field(
        8 << 20, ge=1024, description="largest request body accepted; a larger one gets 413 before it is read"
    )
    body_timeout_s: float = Field(
        60, gt=0, description="longest a request body may take to arrive; a stalled one gets 408"
    )
    api_keys: APIKeySource | None = Field(
        None, description="require `Authorization: Bearer KEY` on /v1/*; keys from an env var or a file"
    )


# The router's keys are in the environment of every Ray process of a node (exported before `raystack
# start`); a backend blanks them for its replicas, which never need them (BackendApp.withheld_env).
DEFAULT_KEYS_ENV = "RAYSTACK_API_KEYS"
DEFAULT_ROUTER_APP = "raystack"


class _CacheFields(_Strict):
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

    @model_validator(mode="after")
    def _a_model_this_backend_serves(self) -> BackendApp:
        self.as_model()
        if self.backend.graceful_shutdown_timeout_s is None:  # a backend cannot see its router: its default bound
            self.backend.graceful_shutdown_timeout_s = RouterConfig().request_timeout_s
        return self

    def as_model(self) -> Model:
        return Model(**self.model.model_dump(), backends=[self.backend])


class RaystackConfig(_CacheFields):
    """A whole raystack service: the router and every model with its backends."""

    models: list[Model] = Field(min_length=1)
    router: RouterConfig = RouterConfig()

    @field_validator("models")
    @classmethod
    def _unique_model_names(cls, models: list[Model]) -> list[Model]:
        _require_unique("model names", [m.name for m in models])
        return models

    @model_validator(mode="after")
    def _a_backend_for_adapters(self) -> RaystackConfig:
        """Checked on the whole model, not per backend application: a model's synthetic backend may stand
        beside the one that serves its adapters."""
        for model in self.models:
            if model.adapters and not any(b.spec.serves_adapters for b in model.backends):
                takers = [e.name for e in registry().values() if e.serves_adapters]
                raise ValueError(f"model {model.name}: no backend serves its LoRA adapters; give it a backend of "
                                 f"engine: {' or '.join(takers)}, or remove adapters")
        return self

    @model_validator(mode="after")
    def _one_meaning_per_name(self) -> RaystackConfig:
        """Clients name a model or an adapter alike in `model`: each name must mean one thing."""
        models = {m.name for m in self.models}
        adapters = [a.name for m in self.models for a in m.adapters]
        _require_unique("adapter names across models", adapters)
        taken = sorted(models & set(adapters))
        if taken:
            raise ValueError(f"adapters named like a model: {taken}; give each adapter a name of its own")
        return self

    @model_validator(mode="after")
    def _some_weight(self) -> RaystackConfig:
        for model in self.models:
            if model.routing.policy == "weighted" and not any(b.weight > 0 for b in model.backends):
                raise ValueError(f"model {model.name}: routing.policy weighted needs a backend with weight above 0")
        return self

    @model_validator(mode="after")
    def _drain_as_long_as_a_request_may_run(self) -> RaystackConfig:
        for backend in (b for m in self.models for b in m.backends):
            if backend.graceful_shutdown_timeout_s is None:
                backend.graceful_shutdown_timeout_s = self.router.request_timeout_s
        return self

    def backend_apps(self, router: str = DEFAULT_ROUTER_APP) -> dict[str, BackendApp]:
        """Each backend as the application it is deployed as, by application name."""
        keys = self.router.api_keys
        withheld = [keys.env] if keys and keys.env else [DEFAULT_KEYS_ENV]
        return {
            backend_app_name(router, model.name, backend.name): BackendApp(
                router=router, model=model.fields, backend=backend, withheld_env=withheld,
                cache_dir=self.cache_dir, cache_shared=self.cache_shared,
            )
            for model in self.models for backend in model.backends
        }

    @classmethod
    def assemble(cls, router: RouterConfig, backends: list[BackendApp]) -> RaystackConfig:
        """The service a router and its backend applications make. A model's backends must agree on what
        the model is (its source and routing)."""
        fields: dict[str, ModelFields] = {}
        served_by: dict[str, list[Backend]] = {}
        for app in backends:
            known = fields.setdefault(app.model.name, app.model)
            if known != app.model:
                raise ValueError(f"the backends of model {app.model.name} disagree on what it is: "
                                 f"{known.model_dump()} vs {app.model.model_dump()}; give each the same model: block")
            served_by.setdefault(app.model.name, []).append(app.backend)
        models = {name: Model(**fields[name].model_dump(), backends=served) for name, served in served_by.items()}
        cache = {(app.cache_dir, app.cache_shared) for app in backends}
        cache_dir, cache_shared = cache.pop() if len(cache) == 1 else (None, False)
        return cls(models=list(models.values()), router=router, cache_dir=cache_dir, cache_shared=cache_shared)


def _error_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path or "(top level)"


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        path = _error_path(tuple(e["loc"]))
        if prefix:
            path = f"{prefix}.{path}" if path != "(top level)" else prefix
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling and indentation)"
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


ParsedArgs = TypeVar("ParsedArgs", bound=BaseModel)


def parse_args(kind: type[ParsedArgs], args: dict[str, Any] | None, where: str = "args") -> ParsedArgs:
    """An application's `args` as `kind` (RouterConfig, BackendApp, RaystackConfig), or the error by path."""
    try:
        return kind.model_validate(args or {})
    except ValidationError as err:
        raise ConfigError(f"invalid raystack config:\n{format_validation_error(err, where)}") from None


def parse_config(args: dict[str, Any] | None, where: str = "args") -> RaystackConfig:
    return parse_args(RaystackConfig, args, where)


def backend_app_name(router: str, model: str, backend: str) -> str:
    """The application a whole config's backend is deployed as (RaystackConfig.backend_apps)."""
    return f"{router}.{model}.{backend}"


def deployment_name(model: str, backend: str) -> str:
    """Serve deployment name of one model backend (shown in the Ray dashboard)."""
    return f"LLMServer-{model}-{backend}"
