"""Synthetic engine: no model, deterministic words at a configured pace. For load tests and router
benchmarks, where the engine's cost would hide what is being measured.

A "token" is a whitespace-separated word, so usage is checkable from the text alone: prompt_tokens are
the words of the prompt (chat: of every message's content), completion_tokens the words answered. The
answer is words cycled from a fixed vocabulary, starting where the prompt's checksum points: the same
request always gets the same text. Sampling parameters (temperature, top_p, seed, stop, ignore_eos) are
accepted and have no effect. The answer is `max_tokens` (or `max_completion_tokens`) long, finish_reason
"length"; or, when the request sets neither, `synthetic.output_tokens` long, finish_reason "stop" (unless
max_model_len leaves less room: then as much as fits, "length"). n must be 1; prompt + max_tokens beyond
max_model_len (32768 unless set) is a 400.

Pace: the first token `ttft_ms` after the request arrives, then one every 1/`tokens_per_s` seconds,
each on an absolute deadline so sleeping late never accumulates into drift.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator

from pydantic import BaseModel, ConfigDict, Field

from raystack.engines.base import Answer, EngineSpec, Refusal, RequestKind
from raystack.protocol import (SSE_DONE, completion_prompts, error_body, message_text, response_format_of, sse_event,
                               tool_choice_of)

if TYPE_CHECKING:
    from raystack.config import Backend
    from raystack.observability.metrics import ReplicaMetrics

# A synthetic replica only sleeps between tokens: a tenth of a core lets several share a small machine.
SYNTHETIC_REPLICA_CPUS = 0.1
# A synthetic "model" has a context like a real one, so no request can ask it for billions of words.
SYNTHETIC_DEFAULT_CONTEXT = 32768


class SyntheticSettings(BaseModel):
    """The backend's `synthetic:` block: pace and length of the answers."""

    model_config = ConfigDict(extra="forbid")

    ttft_ms: float = Field(50, ge=0, description="time to the first token")
    tokens_per_s: float | None = Field(
        50, ge=0, description="pace after the first token; 0 or null: as fast as possible"
    )
    output_tokens: int = Field(64, ge=1, description="answer length when the request sets no max_tokens")
    startup_s: float = Field(0, ge=0, description="time a replica takes to start, as a model load would")


def _validate(backend: Backend) -> None:
    if backend.device != "cpu":
        raise ValueError("engine: synthetic runs no model and needs no NPU; use device: cpu")


def _refuses(kind: RequestKind, body: dict[str, Any], backend: Backend) -> Refusal | None:
    """Filler words can be neither a tool call nor JSON: say so rather than answer words."""
    if tool_choice_of(body) not in (None, "none"):
        return Refusal("tools", "the synthetic engine answers filler words and calls no tools")
    if response_format_of(body):
        return Refusal("response_format", "the synthetic engine answers filler words, not JSON")
    return None


ENGINE = EngineSpec(
    name="synthetic",
    engine_class="raystack.engines.synthetic:SyntheticEngine",
    settings=SyntheticSettings,
    loads_model=False,
    devices=("cpu",),
    default_max_model_len=SYNTHETIC_DEFAULT_CONTEXT,
    replica_cpus={"cpu": SYNTHETIC_REPLICA_CPUS},
    validate=_validate,
    refuses=_refuses,
)

VOCABULARY = (
    "the quick brown fox jumps over a lazy dog while seven bright stars drift across "
    "an open evening sky and distant rivers carry small boats toward quiet harbors where "
    "old sailors mend their nets beneath tall lanterns glowing softly in cool salty air"
).split()

# OpenAI's names per request kind: id prefix, response object, chunk object.
OBJECTS = {
    "chat": ("chatcmpl", "chat.completion", "chat.completion.chunk"),
    "completion": ("cmpl", "text_completion", "text_completion"),
}


class RequestError(ValueError):
    """A request this engine refuses: answered with a 400 in OpenAI's error shape."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


def prompt_text(kind: RequestKind, body: dict[str, Any]) -> tuple[str, int]:
    """The prompt as text (seeds the answer) and its length in tokens."""
    if kind == "chat":
        text = " ".join(message_text(m.get("content")) for m in body.get("messages") or [])
        return text, len(text.split())
    prompts = completion_prompts(body.get("prompt", ""))
    if len(prompts) > 1:
        raise RequestError("engine: synthetic answers one prompt per request; send them separately.", "prompt")
    prompt = prompts[0]
    if isinstance(prompt, list):  # token ids: each id is one token
        return " ".join(map(str, prompt)), len(prompt)
    return prompt, len(prompt.split())


@dataclass(frozen=True)
class Script:
    """What one request will be answered with."""

    words: list[str]
    prompt_tokens: int
    finish_reason: str  # "length" when max_tokens or the context set the length, else "stop"

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(self.words),
            "total_tokens": self.prompt_tokens + len(self.words),
        }


def plan_answer(kind: RequestKind, body: dict[str, Any], settings: SyntheticSettings,
                max_model_len: int | None) -> Script:
    if (body.get("n") or 1) > 1:
        raise RequestError("engine: synthetic supports only n=1.", "n")
    text, prompt_tokens = prompt_text(kind, body)
    requested = body.get("max_completion_tokens") or body.get("max_tokens")
    length = requested or settings.output_tokens
    if max_model_len is not None:
        if requested is None:  # as vLLM does: an unset length fills at most the rest of the context
            length = max(1, min(length, max_model_len - prompt_tokens))
        if prompt_tokens + length > max_model_len:
            where = "messages" if kind == "chat" else "prompt"
            raise RequestError(
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{prompt_tokens + length} tokens ({prompt_tokens} in the {where}, {length} in the "
                f"completion). Please reduce the length of the {where} or completion.",
                where, "context_length_exceeded",
            )
    start = zlib.crc32(text.encode())  # stable across processes, unlike hash()
    words = [VOCABULARY[(start + i) % len(VOCABULARY)] for i in range(length)]
    cut_short = requested or length < settings.output_tokens  # by the request, or by the context
    return Script(words, prompt_tokens, "length" if cut_short else "stop")


class Pace:
    """Absolute deadlines: token i is due ttft + i x interval after the request arrived."""

    def __init__(self, settings: SyntheticSettings):
        self.loop = asyncio.get_running_loop()
        self.start = self.loop.time()
        self.ttft = settings.ttft_ms / 1000
        self.interval = 1 / settings.tokens_per_s if settings.tokens_per_s else 0.0

    async def until(self, token_index: int) -> None:
        due = self.start + self.ttft + token_index * self.interval
        await asyncio.sleep(max(0.0, due - self.loop.time()))  # sleep(0) still yields to the loop


class SyntheticEngine:
    def __init__(self, model_name: str, model_path: Path | None, backend: Backend,
                 metrics: ReplicaMetrics | None = None):
        self.model_name = model_name
        self.metrics = metrics
        self.settings: SyntheticSettings = backend.synthetic  # config fills it for engine: synthetic
        self.max_model_len = backend.max_model_len
        self.running = 0
        self.completed = 0
        self.cancelled = 0

    async def start(self) -> None:
        await asyncio.sleep(self.settings.startup_s)  # stands in for loading a model

    async def generate(self, kind: RequestKind, body: dict[str, Any]) -> Answer:
        try:
            answer = plan_answer(kind, body, self.settings, self.max_model_len)
        except RequestError as err:
            return Answer.whole(400, error_body(400, str(err), err.param, err.code))
        pace = Pace(self.settings)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return Answer.streamed(self._stream(kind, answer, pace, include_usage))
        with self._in_flight():
            await pace.until(len(answer.words) - 1)  # the whole answer, as if it had been streamed
        self._record(answer, pace)
        return Answer.whole(200, self._response(kind, answer))

    async def _stream(
        self, kind: RequestKind, answer: Script, pace: Pace, include_usage: bool
    ) -> AsyncIterator[str]:
        prefix, _, chunk_object = OBJECTS[kind]
        header = {"id": f"{prefix}-{uuid.uuid4().hex}", "object": chunk_object, "created": int(time.time()),
                  "model": self.model_name}
        last = len(answer.words) - 1
        with self._in_flight():  # the request's work is its tokens: it is complete once the last is out
            for i, word in enumerate(answer.words):
                await pace.until(i)
                text = word if i == 0 else " " + word
                if kind == "chat":  # the role rides on the first token, so the first chunk marks TTFT
                    delta = {"role": "assistant", "content": text} if i == 0 else {"content": text}
                    choice: dict[str, Any] = {"index": 0, "delta": delta}
                else:
                    choice = {"index": 0, "text": text}
                choice |= {"logprobs": None, "finish_reason": answer.finish_reason if i == last else None}
                yield sse_event({**header, "choices": [choice]})
        self._record(answer, pace)
        if include_usage:  # OpenAI's shape: a last chunk with no choices, only usage
            yield sse_event({**header, "choices": [], "usage": answer.usage()})
        yield SSE_DONE

    def _response(self, kind: RequestKind, answer: Script) -> dict[str, Any]:
        prefix, response_object, _ = OBJECTS[kind]
        text = " ".join(answer.words)
        choice: dict[str, Any] = {"index": 0}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice |= {"logprobs": None, "finish_reason": answer.finish_reason}
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": response_object, "created": int(time.time()),
                "model": self.model_name, "choices": [choice], "usage": answer.usage()}

    def _record(self, answer: Script, pace: Pace) -> None:
        """The finished request's figures, from its schedule (what a client sees, less the network)."""
        if self.metrics is None:
            return
        tokens = len(answer.words)
        self.metrics.first_tokens([pace.ttft])
        self.metrics.token_gaps([pace.interval] * (tokens - 1))
        latency = pace.loop.time() - pace.start
        self.metrics.request_finished(latency, answer.prompt_tokens, tokens,
                                      tpot=(latency - pace.ttft) / (tokens - 1) if tokens > 1 else None)

    @contextlib.contextmanager
    def _in_flight(self) -> Iterator[None]:
        """Count a request as running until it ends; one that ends early (the consumer left, its task
        was cancelled) counts as cancelled."""
        self.running += 1
        try:
            yield
        except BaseException:
            self.cancelled += 1
            raise
        else:
            self.completed += 1
        finally:
            self.running -= 1

    def stats(self) -> dict[str, int]:
        return {"running": self.running, "waiting": 0, "completed": self.completed, "cancelled": self.cancelled}

    async def check_health(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass
