"""A model (`model:`): what clients ask for by name, where its weights come from, how its requests are routed
over its backends, and its LoRA adapters."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from raystack.config.backend import Backend
from raystack.config.strict import NAME_PATTERN, Strict, require_unique


class Routing(Strict):
    """How the router spreads one model's requests over its backends and their replicas."""

    policy: Literal["least_loaded", "prefix_affinity", "weighted", "kv_aware"] = Field(
        "least_loaded",
        description="least_loaded: fewest in-flight requests (power-of-two sampling); prefix_affinity: the same "
        "prompt prefix to the same replica while its load stays within affinity_slack, else least_loaded; "
        "weighted: backends by their weight, replicas least_loaded; kv_aware: by the blocks each vLLM "
        "replica's KV cache holds, from the engines' KV cache events, combined with load (replicas without "
        "events, such as MindIE's, least_loaded)",
    )
    prefix_chars: int = Field(
        2048, ge=64, description="prefix_affinity: how many leading characters of the prompt are matched"
    )
    affinity_slack: int = Field(
        4, ge=0, description="in-flight requests a preferred replica may carry beyond the least-loaded one "
        "before a request goes elsewhere: under prefix_affinity the replica that served the prefix; under "
        "every policy one that holds the request's LoRA adapter"
    )
    kv_load_tokens: int = Field(
        256, ge=1, description="kv_aware: the prompt tokens one request in flight on a replica weighs against "
        "the cached prompt tokens it holds: a replica holding a 1,024-token prefix wins while it carries fewer "
        "than 4 requests more than the others (at 256)"
    )


class Adapter(Strict):
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


class ModelFields(Strict):
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
        require_unique("adapter names", names)
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
        require_unique("backend names within a model", [b.name for b in backends])
        return backends

    @model_validator(mode="after")
    def _names_the_engines_accept(self) -> Model:
        for backend in self.backends:
            backend.spec.check_model_name(self.name)
            for adapter in self.adapters if backend.spec.serves_adapters else ():
                backend.spec.check_adapter_name(adapter.name)
        return self

    @model_validator(mode="after")
    def _kv_events_where_routed_by_them(self) -> Model:
        """Under kv_aware, each backend whose engine publishes KV cache events must be able to (vLLM: with its
        prefix cache on); backends of other engines are routed least_loaded."""
        if self.routing.policy == "kv_aware":
            for backend in self.backends:
                if backend.spec.publishes_kv_events:
                    try:
                        backend.spec.kv_events_rules(backend)
                    except ValueError as err:
                        raise ValueError(f"backend {backend.name!r} under routing.policy kv_aware: {err}") from None
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
