"""A request's checks in the router before it goes to any backend: its body read within bounds (a body over
`max_request_bytes` -> 413, one that stalls past `body_timeout_s` -> 408), a completion length the model has
room for, and the backends of its model able to honour it (each engine's `refuses`); and, from its body's end
to its answer's start, its client watched (ClientWatch): one that leaves is not served."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from fastapi import Request

from raystack.config import Backend, Model
from raystack.engines.base import Refusal
from raystack.protocol import OpenAIError


def _too_large(limit: int) -> OpenAIError:
    return OpenAIError(
        413, f"The request body exceeds {limit} bytes (router.max_request_bytes). Send a shorter prompt, "
        f"or raise the limit in the deploy config.", code="request_too_large",
    )


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, or a 413 as soon as it is known to exceed `limit` bytes: from Content-Length
    before reading, or while reading a body sent without one (chunked). A body still incomplete after
    `timeout_s` is a 408: a client that stalls must not hold a router slot forever."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    parts, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for part in request.stream():
                size += len(part)
                if size > limit:
                    raise _too_large(limit)
                parts.append(part)
    except TimeoutError:
        raise OpenAIError(408, f"The request body did not arrive within {timeout_s:g} s "
                               f"(router.body_timeout_s; {size} bytes came). Send the whole body at once.",
                          code="request_timeout") from None
    return b"".join(parts)


class ClientWatch:
    """Between a request's body and its response's start, nothing reads the client's connection: a client
    that left while its request waited for a slot or its first token would still be served (a slot taken,
    an engine generating for nobody). Watched, its leaving cancels the request's task (`left` says why), and
    every wait on the way unwinds: its place in a queue, its slot, its generation upstream."""

    def __init__(self) -> None:
        self.left = False
        self.watcher: asyncio.Task | None = None

    def start(self, receive: Callable[[], Awaitable[dict]]) -> None:
        """Watch from now on (the body read: what `receive` gives next is the client's leaving)."""
        self.watcher = asyncio.ensure_future(self._watch(receive, asyncio.current_task()))

    async def _watch(self, receive: Callable[[], Awaitable[dict]], request: asyncio.Task) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.left = True
        request.cancel()

    def stop(self) -> None:
        """The response starts (or the request ended): its own machinery watches the client from here."""
        if self.watcher is not None:
            self.watcher.cancel()


def check_length_bounds(model: Model, body: dict[str, Any]) -> None:
    """A completion length no backend of `model` has room for is a 400 here, before any engine sees it."""
    limit = model.context_limit
    for param in ("max_completion_tokens", "max_tokens"):
        requested = body.get(param)
        if limit is not None and requested is not None and requested >= limit:
            raise OpenAIError(
                400, f"This model's maximum context length is {limit} tokens, which the prompt shares; "
                f"{param} {requested} leaves it no room. Lower {param} below {limit}.",
                param=param, code="context_length_exceeded",
            )


def _refusal(backend: Backend, kind: str, body: dict[str, Any], adapter: str | None) -> Refusal | None:
    if adapter and not backend.spec.serves_adapters:
        return Refusal("model", f"engine: {backend.engine} serves no LoRA adapter")
    return backend.spec.refuses(kind, body, backend)


def backends_unable(model: Model, pinned: str | None, kind: str, body: dict[str, Any],
                    adapter: str | None = None) -> frozenset[str]:
    """The backends of `model` that cannot honour this request (tools without a parser, say: each engine's
    `refuses`; an adapter on an engine without LoRA), which it must not go to. A 400 naming what and why
    when that leaves none for it."""
    refusals = {b.name: refusal for b in model.backends if (refusal := _refusal(b, kind, body, adapter))}
    if pinned in refusals:
        able = [b.name for b in model.backends if b.name not in refusals]
        raise OpenAIError(
            400, f"Backend `{pinned}` of `{model.name}` cannot take this request: {refusals[pinned].reason}."
            + (f" Its backends that can: {', '.join(able)}." if able else ""),
            param=refusals[pinned].param, code="unsupported_by_backend",
        )
    if refusals and len(refusals) == len(model.backends):
        raise OpenAIError(
            400, f"No backend of `{model.name}` can take this request: "
            + "; ".join(f"{name}: {refusal.reason}" for name, refusal in refusals.items()) + ".",
            param=next(iter(refusals.values())).param, code="unsupported_by_backend",
        )
    return frozenset(refusals)
