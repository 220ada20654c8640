"""A toy engine in one file, as a third party would add one: its settings block, its rule, its spec and its
class. It "loads" a checkpoint (a directory with a config.json, which raystack prepares as for any engine)
and echoes the last user message after `toy.prefix`, streamed one word per chunk or whole; in the prefix,
{visible} becomes the ASCEND_RT_VISIBLE_DEVICES its replica's engine started with, {granted} the NPUs Ray
granted the replica and {model} the checkpoint's path, so tests can ask a replica what it runs on. tests/conftest.py
registers it for the test session through the `raystack.engines` entry point."""

from __future__ import annotations

import os
import time
from typing import Any, AsyncIterator

import ray
from pydantic import BaseModel, ConfigDict

from raystack.engines.base import Answer, EngineSpec
from raystack.protocol import SSE_DONE, error_body, message_text, sse_event


class ToySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prefix: str = "echo:"


def _validate(backend: Any) -> None:
    if not backend.toy.prefix.strip():
        raise ValueError("toy.prefix must not be blank")


ENGINE = EngineSpec(
    name="toy",
    engine_class="tests.toy_engine:ToyEngine",
    settings=ToySettings,
    devices=("cpu", "npu"),
    replica_cpus={"cpu": 0.1, "npu": 0.1},
    default_max_model_len=1024,
    validate=_validate,
)


class ToyEngine:
    def __init__(self, model_name: str, model_path: Any, backend: Any, metrics: Any = None):
        self.model_name = model_name
        self.model_path = model_path
        self.prefix = backend.toy.prefix
        self.answered = 0

    async def start(self) -> None:
        granted = ray.get_runtime_context().get_accelerator_ids().get("NPU", [])
        if not (self.model_path / "config.json").is_file():
            raise RuntimeError(f"no checkpoint at {self.model_path}")
        self.prefix = self.prefix.format(visible=os.environ.get("ASCEND_RT_VISIBLE_DEVICES", "-"),
                                         granted=",".join(sorted(granted, key=int)) or "-", model=self.model_path)

    async def generate(self, kind: str, body: dict[str, Any]) -> Answer:
        if kind != "chat":
            return Answer.whole(400, error_body(400, "the toy engine answers chat only", param="prompt"))
        text = f"{self.prefix} {message_text(body['messages'][-1].get('content'))}"
        self.answered += 1
        if body.get("stream"):
            return Answer.streamed(self._stream(text))
        return Answer.whole(200, {"id": "toy-1", "object": "chat.completion", "created": int(time.time()),
                                  "model": self.model_name, "choices": [
                                      {"index": 0, "message": {"role": "assistant", "content": text},
                                       "finish_reason": "stop"}]})

    async def _stream(self, text: str) -> AsyncIterator[str]:
        for i, word in enumerate(text.split()):
            delta = {"role": "assistant", "content": word} if i == 0 else {"content": " " + word}
            yield sse_event({"id": "toy-1", "object": "chat.completion.chunk", "created": int(time.time()),
                             "model": self.model_name, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
        yield SSE_DONE

    def stats(self) -> dict[str, int]:
        return {"running": 0, "waiting": 0, "answered": self.answered}

    async def check_health(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass
