"""What crosses between a router process and an LLMServer replica: the call (Dispatch) and the first item of
its answer (Opening). Both sides import this module; it holds no engine and no Serve state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raystack.engines.base import RequestKind
from raystack.json_codec import decode
from raystack.replica.chunk_channel import ReplyTo


@dataclass(eq=False)
class Dispatch:
    """One try of a request at a backend, as the router's Forwarder hands it to the backend's Serve handle.

    The replica answers `kind` and `body`. `route` (the prompt's prefix blocks) and `avoid` (replicas that
    failed this request already) are for Serve's request router, which picks the replica in the router's own
    process (router/replica_choice.py) and writes down which one in `replica`, so that a try failing before
    its answer opens is blamed on the right replica, and (kv_aware) in `cached_tokens` the prompt tokens its KV
    cache held of the route when chosen. `pinned`: the replica the router picked for it as Serve's request router
    would (which tries that one first), counted there on the router's RoutingBoard (`ahead`) until Serve routes
    it; a stream is `started` there already, over the chunk channel (replica/early_start.py). Only kind, body
    and reply_to are sent to the replica."""

    kind: RequestKind
    body: dict[str, Any]
    route: tuple[int, ...] = ()
    avoid: tuple[str, ...] = ()
    replica: str | None = None
    cached_tokens: int | None = None  # kv_aware: of the route, what the chosen replica's cache held then
    reply_to: ReplyTo | None = None  # where a stream's chunks go (chunk_channel.py); names an early start
    pinned: str | None = None  # the replica the router picked for it (replica_choice.BackendRequestRouter.pin)
    counted_ahead: bool = False  # counted on `pinned` in the RoutingBoard's `ahead`: Serve has not routed it yet
    started: bool = False  # started on `pinned` over the chunk channel already (replica/early_start.py)

    def __getstate__(self) -> dict[str, Any]:
        return {"kind": self.kind, "body": self.body, "reply_to": self.reply_to}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)


@dataclass(frozen=True)
class Opening:
    """The first item of every answer: the replica answering, and either the whole JSON answer (status, body)
    or the first SSE chunk of a stream. `failure`: what the engine said if it failed on its side before the
    first token (a 5xx answer, or a stream whose first event is an error with a 5xx code, as vLLM streams its
    failures: `data: {"error": {...}}`), else None. The replica makes it (Opening.whole, .streamed) and sends
    it as its call's first item; a stream through the chunk channel sends its first chunk there, and the
    router makes the Opening of it."""

    replica: str
    status: int | None = None
    body: Any = None
    chunk: str | None = None
    failure: str | None = None

    @classmethod
    def whole(cls, replica: str, status: int, body: Any) -> Opening:
        return cls(replica, status=status, body=body, failure=_error_message(body) if status >= 500 else None)

    @classmethod
    def streamed(cls, replica: str, chunk: str) -> Opening:
        return cls(replica, chunk=chunk, failure=_stream_failure(chunk))


def _stream_failure(chunk: str) -> str | None:
    if not chunk.startswith('data: {"error"'):
        return None
    try:
        error = decode(chunk.split("\n\n", 1)[0].removeprefix("data: "))["error"]
    except (ValueError, KeyError, TypeError):
        return None
    code = error.get("code") if isinstance(error, dict) else None
    return _error_message(error) if isinstance(code, int) and code >= 500 else None


def _error_message(body: Any) -> str:
    error = body.get("error", body) if isinstance(body, dict) else body
    return str(error.get("message", error) if isinstance(error, dict) else error)[:300]
