"""The deploy config: pydantic models of the `args` block of a Ray Serve YAML file.

    applications:
      - name: raystack
        import_path: raystack.app:build_app
        args: {models: [...], router: {...}}      # <- RaystackConfig

Every model is strict: an unknown key is an error that names its path (`models[0].backends[0].foo`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
BUILD_APP_IMPORT_PATH = "raystack.app:build_app"


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
    type: str | None = Field(None, description="required chip type, e.g. Ascend910B")


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


# A synthetic replica only sleeps between tokens: a tenth of a core lets several share a small machine.
SYNTHETIC_REPLICA_CPUS = 0.1
# A synthetic "model" has a context like a real one, so no request can ask it for billions of words.
SYNTHETIC_DEFAULT_CONTEXT = 32768


class SyntheticSettings(_Strict):
    """engine: synthetic, a backend without a model for load tests: deterministic words at a set pace."""

    ttft_ms: float = Field(50, ge=0, description="time to the first token")
    tokens_per_s: float | None = Field(
        50, ge=0, description="pace after the first token; 0 or null: as fast as possible"
    )
    output_tokens: int = Field(64, ge=1, description="answer length when the request sets no max_tokens")
    startup_s: float = Field(0, ge=0, description="time a replica takes to start, as a model load would")


DEFAULT_MINDIE_INSTALL_PATH = "/usr/local/Ascend/mindie/latest/mindie-service"
# A MindIE replica on several nodes runs a MindIENode actor (one process, mostly waiting) on each further node.
MINDIE_NODE_CPUS = 1


class MindIESettings(_Strict):
    """engine: mindie, MindIE Service run as a supervised mindieservice_daemon per replica (engines/mindie.py).
    The replica writes config.json from the installation's shipped one; `overrides` are merged last."""

    install_path: str | None = Field(
        None, description=f"MindIE Service installation holding bin/mindieservice_daemon and conf/config.json "
        f"(default: $MIES_INSTALL_PATH, else {DEFAULT_MINDIE_INSTALL_PATH})"
    )
    max_input_token_len: int | None = Field(
        None, ge=1, description="longest prompt in tokens (maxInputTokenLen; default: max_model_len)"
    )
    max_batch_size: int = Field(200, ge=1, description="sequences decoded together (maxBatchSize)")
    max_prefill_tokens: int | None = Field(
        None, ge=1, description="tokens of one prefill batch (maxPrefillTokens; default: max(8192, max_input_token_len))"
    )
    cache_block_size: int = Field(128, ge=1, description="tokens per KV-cache block (cacheBlockSize)")
    npu_memory_fraction: float = Field(
        0.9, gt=0, le=1, description="share of each NPU's memory MindIE may use (NPU_MEMORY_FRACTION)"
    )
    startup_timeout_s: float = Field(
        1800, gt=0, description="longest wait for the daemon to load the model and open its port"
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="merged into config.json last, e.g. {BackendConfig: {ScheduleConfig: "
        "{maxIterTimes: 1024}}}"
    )


class Backend(_Strict):
    """One engine serving a model: its deployment, placement and engine arguments."""

    name: str = Field(pattern=NAME_PATTERN)
    engine: Literal["vllm", "mindie", "synthetic"] = "vllm"
    device: Literal["cpu", "npu"] = "npu"
    accelerator: Accelerator = Accelerator()
    parallelism: Parallelism | Literal["auto"] = Field(
        Parallelism(), description="tensor/pipeline sizes, or `auto` to size from the model (raystack estimate)"
    )
    placement: Literal["pack", "strict_pack", "spread"] = Field(
        "pack", description="how a replica's NPU bundles spread over nodes (Ray placement strategy)"
    )
    max_model_len: int | None = Field(
        None, ge=16, description=f"context length; default: the model's ({SYNTHETIC_DEFAULT_CONTEXT} for engine: synthetic)"
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="passed to the engine as-is (vLLM: AsyncEngineArgs fields)"
    )
    synthetic: SyntheticSettings | None = Field(None, description="pace and length of engine: synthetic")
    mindie: MindIESettings | None = Field(None, description="MindIE Service settings of engine: mindie")
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
    health_check_period_s: float = Field(10, gt=0)
    health_check_timeout_s: float = Field(30, gt=0)
    graceful_shutdown_timeout_s: float = Field(30, ge=0)

    @property
    def loads_model(self) -> bool:
        """False for engine: synthetic, which answers without model files."""
        return self.engine != "synthetic"

    @property
    def replica_cpus(self) -> float:
        if self.resources.cpus is not None:
            return self.resources.cpus
        if not self.loads_model:
            return SYNTHETIC_REPLICA_CPUS
        return 1.0 if self.device == "cpu" else 2.0

    @property
    def parallel(self) -> Parallelism:
        """The resolved parallelism; build_app resolves `auto` before anything reads it."""
        if self.parallelism == "auto":
            raise ValueError("parallelism: auto is resolved by build_app (raystack.app.resolve_parallelism)")
        return self.parallelism

    @model_validator(mode="after")
    def _mindie_consistency(self) -> Backend:
        if self.engine != "mindie":
            if self.mindie is not None:
                raise ValueError("mindie: applies to engine: mindie only; remove it or set that engine")
            return self
        if self.device != "npu":
            raise ValueError("engine: mindie runs on Ascend NPUs only; use device: npu (or engine: vllm on cpu)")
        if self.engine_args:
            raise ValueError("engine_args are vLLM's; engine: mindie is set up by its mindie: block "
                             "(and mindie.overrides for any config.json key)")
        if self.mindie is None:
            self.mindie = MindIESettings()
        return self

    @model_validator(mode="after")
    def _synthetic_consistency(self) -> Backend:
        if self.engine != "synthetic":
            if self.synthetic is not None:
                raise ValueError("synthetic: applies to engine: synthetic only; remove it or set that engine")
            return self
        if self.engine_args:
            raise ValueError("engine_args are vLLM's; engine: synthetic is set up by its synthetic: block")
        if "device" not in self.model_fields_set:
            self.device = "cpu"  # it runs no model: nothing to place on an NPU
        elif self.device != "cpu":
            raise ValueError("engine: synthetic runs no model and needs no NPU; use device: cpu")
        if self.synthetic is None:
            self.synthetic = SyntheticSettings()
        if self.max_model_len is None:
            self.max_model_len = SYNTHETIC_DEFAULT_CONTEXT
        return self

    @model_validator(mode="after")
    def _device_consistency(self) -> Backend:
        if self.parallelism == "auto" and self.device == "cpu":
            self.parallelism = Parallelism()  # one CPU engine per replica: nothing to size
        if self.device == "cpu" and self.parallel.world_size > 1:
            raise ValueError(
                "parallelism above 1 needs device: npu (vLLM's CPU platform has no Ray executor); "
                "set parallelism to {tensor: 1, pipeline: 1} or device: npu"
            )
        if self.device == "cpu" and self.accelerator.type:
            raise ValueError("accelerator.type applies to device: npu only; remove it or set device: npu")
        return self


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
        4, ge=0, description="prefix_affinity: in-flight requests the matched replica may carry beyond the "
        "least-loaded one before a request goes elsewhere"
    )


class Model(_Strict):
    name: str = Field(pattern=NAME_PATTERN, description="the `model` clients ask for")
    source: str | None = Field(
        None,
        min_length=1,
        description="embedded id, local path, modelscope://Org/Name or hf://Org/Name; "
        "may be left out when every backend is engine: synthetic",
    )
    backends: list[Backend] = Field(min_length=1)
    routing: Routing = Routing()

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
    def _some_weight(self) -> Model:
        if self.routing.policy == "weighted" and not any(b.weight > 0 for b in self.backends):
            raise ValueError("routing.policy weighted needs a backend with weight above 0")
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
    """Where the router reads its API keys: one of an environment variable or a file (raystack.serving.auth)."""

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
    num_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(1024, ge=1)
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


class RaystackConfig(_Strict):
    models: list[Model] = Field(min_length=1)
    router: RouterConfig = RouterConfig()
    cache_dir: str | None = Field(
        None, description="where prepared and downloaded models live (default: $RAYSTACK_CACHE_DIR or ~/.cache/raystack)"
    )

    @field_validator("models")
    @classmethod
    def _unique_model_names(cls, models: list[Model]) -> list[Model]:
        _require_unique("model names", [m.name for m in models])
        return models


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


def parse_config(args: dict[str, Any] | None, where: str = "args") -> RaystackConfig:
    try:
        return RaystackConfig.model_validate(args or {})
    except ValidationError as err:
        raise ConfigError(f"invalid raystack config:\n{format_validation_error(err, where)}") from None


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
        apps.append((name, parse_config(app.get("args"), where=f"applications[{i}].args")))
    if not apps:
        raise ConfigError(f"{path}: no application has import_path: {BUILD_APP_IMPORT_PATH}")
    return apps


def deployment_name(model: str, backend: str) -> str:
    """Serve deployment name of one model backend (shown in the Ray dashboard)."""
    return f"LLMServer-{model}-{backend}"
