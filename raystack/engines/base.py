"""The Engine protocol: the seam between serving (router, LLMServer) and an inference engine.

An engine takes an OpenAI request body and answers either with a whole JSON response (a completion,
or an error in OpenAI's shape) or with a stream of server-sent-event strings (`data: {...}\\n\\n`,
ending with `data: [DONE]\\n\\n`). Adding an engine is one new module and one line in ENGINES.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Literal, Protocol

if TYPE_CHECKING:
    from raystack.config import Backend
    from raystack.observability.metrics import ReplicaMetrics

RequestKind = Literal["chat", "completion"]


@dataclass(frozen=True)
class JSONResult:
    status: int
    body: dict[str, Any]


EngineResult = JSONResult | AsyncIterator[str]


class Engine(Protocol):
    async def start(self) -> None:
        """Load the model; return when the engine can take requests."""

    async def generate(self, kind: RequestKind, body: dict[str, Any]) -> EngineResult:
        """Answer one OpenAI chat or completion request."""

    def stats(self) -> dict[str, int]:
        """The engine's own load now: `running` (requests it is generating for) and `waiting` (requests
        it holds but has not scheduled); an engine may add more counts."""

    async def check_health(self) -> None:
        """Raise if the engine cannot serve any more (Serve then replaces the replica)."""

    async def shutdown(self) -> None:
        """Stop the engine and every process it started."""


# engine name in the deploy config -> "module:class"; imported lazily so the router never loads them.
ENGINES = {
    "vllm": "raystack.engines.vllm:VLLMEngine",
    "mindie": "raystack.engines.mindie:MindIEEngine",
    "synthetic": "raystack.engines.synthetic:SyntheticEngine",
}


def create_engine(model_name: str, model_path: Path | None, backend: "Backend",
                  metrics: "ReplicaMetrics | None" = None) -> Engine:
    """model_path is None for an engine that loads no model (Backend.loads_model). The engine reports
    its requests' latencies and token counts to `metrics`."""
    module, cls = ENGINES[backend.engine].split(":")
    return getattr(importlib.import_module(module), cls)(model_name, model_path, backend, metrics)
