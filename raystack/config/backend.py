"""A backend (`backend:`): one engine serving a model, its deployment, placement and engine arguments. Each
engine's own settings block (`mindie:`, `synthetic:`, ...) is a field added from the engine registry.

Defaults that follow the engine (its first device, its settings block, its max_model_len) are given when the
backend is built; its validators only check, so a backend dumped (to a replica, to Serve's user_config) and
validated again is the same backend.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, create_model, field_validator, model_validator

from raystack.cluster.chips import FAMILIES, family_of, parse_chip
from raystack.config.router import DEFAULT_REQUEST_TIMEOUT_S
from raystack.config.strict import NAME_PATTERN, Strict
from raystack.engines.base import DEFAULT_ENGINE, Device, EngineSpec, engine_spec, registry

# The engines with a settings block: each its own optional field of a backend, named after the engine.
SETTINGS_BLOCKS = tuple(spec.name for spec in registry().values() if spec.settings is not None)


class Parallelism(Strict):
    tensor: int = Field(1, ge=1, description="tensor-parallel size: NPUs per pipeline stage")
    pipeline: int = Field(1, ge=1, description="pipeline-parallel size: stages, usually one per node")

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline


class Accelerator(Strict):
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


class Autoscaling(Strict):
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
        # Serve's own policy, counting the whole answers replicas give with no Serve call as well
        # (replica/direct_answers.py).
        return self.model_dump(exclude_none=True) | {
            "policy": {"policy_function": "raystack.replica.direct_answers:autoscaling_policy"}}


class Resources(Strict):
    cpus: float | None = Field(
        None,
        ge=0,
        description="CPUs Ray reserves for one replica (default: 1 on cpu, 2 on npu, 0.1 for engine: synthetic)",
    )


def _engine_of(data: dict[str, Any]) -> EngineSpec | None:
    """The engine of a backend being validated (None when its `engine:` is not one: that error is said)."""
    return registry().get(data.get("engine"))


def _first_device(data: dict[str, Any]) -> Device:
    spec = _engine_of(data)
    return spec.devices[0] if spec else "npu"


class _BackendFields(Strict):
    """A backend's fields but the engines' settings blocks (Backend below adds them)."""

    name: str = Field(pattern=NAME_PATTERN)
    engine: str = Field(DEFAULT_ENGINE, description=f"the inference engine: {' | '.join(registry())}")
    device: Device = Field(default_factory=_first_device, description="default: the engine's first device")
    accelerator: Accelerator = Accelerator()
    parallelism: Parallelism | Literal["auto"] = Field(
        Parallelism(), description="tensor/pipeline sizes, or `auto` to size from the model (raystack estimate)"
    )
    max_model_len: int | None = Field(
        None, ge=16, validate_default=True,
        description="context length; default: the model's (or the engine's, for an engine without one)"
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
        cannot see its router's args, so unset it is the router's default request_timeout_s; a whole config
        gives its backends its router's (service.py), and config check refuses one shorter than the router's
        (rules.py), so an engine that bounds answers itself (MindIE's timeouts) never cuts one the router
        allows."""
        if self.graceful_shutdown_timeout_s is not None:
            return self.graceful_shutdown_timeout_s
        return DEFAULT_REQUEST_TIMEOUT_S

    @property
    def parallel(self) -> Parallelism:
        """The resolved parallelism: `auto` on cpu is one engine per replica (nothing to size); on npu
        build_backend resolves it before anything reads it."""
        if self.parallelism != "auto":
            return self.parallelism
        if self.device == "cpu":
            return Parallelism()
        raise ValueError("parallelism: auto is resolved by build_backend (raystack.app.resolve_parallelism)")

    @property
    def sizes_itself(self) -> bool:
        """Whether `parallelism: auto` is left for build_backend to size from the model (on NPUs only)."""
        return self.parallelism == "auto" and self.device != "cpu"

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

    @field_validator("max_model_len", *SETTINGS_BLOCKS, check_fields=False)
    @classmethod
    def _engine_default(cls, value: Any, info: ValidationInfo) -> Any:
        """Unset or null: the engine's default max_model_len, and its own settings block (`mindie:` with
        nothing under it is MindIE's defaults); another engine's block stays unset (_engine_rules)."""
        spec = _engine_of(info.data)
        if value is not None or spec is None:
            return value
        if info.field_name == "max_model_len":
            return spec.default_max_model_len
        return spec.settings() if info.field_name == spec.name else None

    @model_validator(mode="after")
    def _engine_rules(self) -> _BackendFields:
        spec = self.spec
        for other in registry().values():
            if other.settings is not None and other.name != self.engine and getattr(self, other.name) is not None:
                raise ValueError(f"{other.name}: applies to engine: {other.name} only; remove it or set that engine")
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
    **{name: (engine_spec(name).settings | None, Field(None, validate_default=True,
                                                       description=f"settings of engine: {name}"))
       for name in SETTINGS_BLOCKS},
)
