"""The load generator of `raystack bench`: streams OpenAI requests and times every token.

Our own rather than a wrapped `vllm bench serve`: it must run where vLLM is not installed (a laptop in
front of a MindIE cluster), send to several targets in one interleaved run, and read both chat and
completion streams, reasoning text included. It uses aiohttp, as vllm bench serve does: on a small
machine the client shares the CPU with the server, and a pure-Python HTTP client costs the server
throughput. Its definitions follow `vllm bench serve` so the figures compare (the README shows both on
one endpoint):

- TTFT: request sent -> first chunk carrying text.
- ITL: the gaps between successive chunks carrying text.
- TPOT: (latency - TTFT) / (output tokens - 1), the first token excluded.
- Output tokens: the server's usage (stream_options.include_usage), else the text chunks counted.
- Reasoning tokens (thinking models, with the backend's reasoning parser on): the server's
  usage.completion_tokens_details.reasoning_tokens (MindIE, DeepSeek's API), else the chunks carrying
  reasoning text (vLLM streams one token a chunk; its usage counts them only for some parsers). Part of
  the output tokens.
- Time to answer: request sent -> first chunk carrying answer text (content), after any thinking.
- Per-request output tokens/s: output tokens / latency (the per-request figure GPUStack's comparison shows).
- Cached prompt tokens: the server's usage.prompt_tokens_details.cached_tokens, where it reports them (vLLM
  with enable_prompt_tokens_details).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import aiohttp

from raystack.bench.datasets import Prompt

API = Literal["chat", "completions"]


@dataclass
class RequestResult:
    ok: bool
    latency: float = 0.0  # seconds from send to the last byte
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    reasoning_tokens: int = 0
    time_to_answer: float | None = None  # to the first content, after the thinking
    input_tokens: int | None = None
    cached_tokens: int | None = None  # of the input, what the server's prefix cache held
    headers: dict[str, str] = field(default_factory=dict)  # the response's, names in lower case
    status: int | None = None  # the response's HTTP status; None when none came
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    @property
    def tokens_per_s(self) -> float | None:
        return self.output_tokens / self.latency if self.ok and self.latency > 0 else None


def request_body(api: API, model: str, prompt: Prompt, ignore_eos: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True}}
    if api == "chat":
        body["messages"] = prompt.messages
    else:
        body["prompt"] = prompt.text
    if prompt.max_tokens is not None:
        body["max_tokens"] = prompt.max_tokens
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM's and MindIE's extension: every answer runs to max_tokens
    return body


def _chunk_text(api: API, choice: dict[str, Any]) -> tuple[str, str]:
    """(answer text, reasoning text) of one streamed choice."""
    if api == "completions":
        return choice.get("text") or "", ""
    delta = choice.get("delta") or {}
    # Reasoning models (Qwen3, DeepSeek-R1) stream their thinking apart from the answer: both are tokens.
    return delta.get("content") or "", delta.get("reasoning_content") or delta.get("reasoning") or ""


async def send(session: aiohttp.ClientSession, url: str, body: dict[str, Any], api: API,
               headers: dict[str, str]) -> RequestResult:
    start = time.perf_counter()
    last = start
    result = RequestResult(ok=False)
    reasoning_chunks = 0
    reported_reasoning = 0
    try:
        async with session.post(url, json=body, headers=headers) as response:
            result.status = response.status
            result.headers = {name.lower(): value for name, value in response.headers.items()}
            if response.status != 200:
                text = (await response.read()).decode(errors="replace")
                result.error = f"HTTP {response.status}: {text[:300]}"
                result.latency = time.perf_counter() - start
                return result
            async for raw in response.content:  # one SSE line at a time
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"stream error: {chunk['error'].get('message', chunk['error'])}"[:300]
                    break
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"].get("completion_tokens") or 0
                    result.input_tokens = chunk["usage"].get("prompt_tokens")
                    result.cached_tokens = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
                    reported_reasoning = (chunk["usage"].get("completion_tokens_details") or {}).get(
                        "reasoning_tokens") or 0
                texts = [_chunk_text(api, c) for c in chunk.get("choices") or []]
                if any(answer or reasoning for answer, reasoning in texts):
                    now = time.perf_counter()
                    reasoning_chunks += any(reasoning for _, reasoning in texts)
                    if result.time_to_answer is None and any(answer for answer, _ in texts):
                        result.time_to_answer = now - start
                    if result.ttft is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as err:
        result.error = f"{type(err).__name__}: {err}"[:300]
    result.latency = time.perf_counter() - start
    if not result.output_tokens:  # no usage from the server: count the chunks that carried text
        result.output_tokens = len(result.itl) + (result.ttft is not None)
    result.reasoning_tokens = reported_reasoning or reasoning_chunks
    if result.ttft is None and result.error is None:
        result.error = "the answer carried no text"
    result.ok = result.error is None
    return result


@dataclass(frozen=True)
class Load:
    """How requests are offered: at most `concurrency` in flight; arrivals at `request_rate` per second
    (Poisson) or all at once (inf)."""

    concurrency: int
    request_rate: float = float("inf")
    seed: int = 0


async def run_load(base_url: str, model: str, prompts: list[Prompt], load: Load, api: API = "chat",
                   ignore_eos: bool = False, api_key: str | None = None, timeout_s: float = 600,
                   on_done: Callable[[RequestResult], None] | None = None) -> tuple[list[RequestResult], float]:
    """Send every prompt under `load`; return the results (in prompt order) and the wall time taken."""
    url = base_url.rstrip("/") + ("/v1/chat/completions" if api == "chat" else "/v1/completions")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    gate = asyncio.Semaphore(load.concurrency)
    rng = random.Random(load.seed)

    async def one(session: aiohttp.ClientSession, prompt: Prompt) -> RequestResult:
        async with gate:
            result = await send(session, url, request_body(api, model, prompt, ignore_eos), api, headers)
        if on_done is not None:
            on_done(result)
        return result

    connector = aiohttp.TCPConnector(limit=load.concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(one(session, prompt)))
            if load.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(load.request_rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start
