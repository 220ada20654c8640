"""Exchange: one request in a router process, from admission to settlement, and its only owner.

The ingress (ingress.py) fills it in as it checks the request: the key's grant, the body, the model, a
pinned backend, a LoRA adapter, the backends unable to honour it; the key's meter and its admission by the
ledger (quotas.py); then the Forwarder (forwarding.py) records the delivery, the backend's answer. However
the request ends, `close()` ends it, once: the backend's slot back (and the generation stopped upstream
unless it ran to its end), the key's usage counted (metrics, and the settlement the ledger books), and its
access log line written:

    POST /v1/chat/completions 200 0.412s model=qwen3 backend=vllm replica=ab12 key=team-a class=interactive

A request ends in one of four ways, and each calls `close()`: refused or failed before a backend answered
(the ingress, as the error goes out); a whole answer (the ingress, once it has the body); a stream that ran
to its end or was cut (the relay's `finally`); and a stream its client left before it was ever iterated,
whose relay never ran a line and so has no `finally`: for that one only, a weakref.finalize on the
response's body iterator closes the exchange when the response is dropped. As in Ray Serve LLM, where a
request's context is settled in its stream wrapper's `finally`.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable

from raystack.engines.base import RequestKind
from raystack.protocol import prompt_text
from raystack.router.fair_share import ONE_BAND, Band
from raystack.router.metering import Meter, ask_for_usage, estimate_prompt_tokens
from raystack.router.usage import Cost

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentResponseGenerator

    from raystack.config import Model
    from raystack.observability.access_log import AccessLog
    from raystack.observability.metrics import RouterMetrics
    from raystack.replica.calls import Opening
    from raystack.replica.chunk_channel import Sink
    from raystack.router.auth import Grant
    from raystack.router.quotas import Quotas

UNRESOLVED = "-"  # the model named in metrics before the request's model is known
PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


@dataclass(eq=False)
class Delivery:
    """A request a backend has opened its answer to: who serves it, the opening, and (for a stream) the
    rest, as the Forwarder (forwarding.py) got it. It holds one of the backend's in-flight slots until `end`,
    which its Exchange calls once."""

    model: str
    backend: str
    opening: Opening
    stream: DeploymentResponseGenerator | None  # None: a direct answer (replica/direct_answers.py)
    deadline: float  # loop time by which the whole answer must be through (router.request_timeout_s)
    release: Callable[[], None]  # gives the slot back
    upstream_done: bool = False  # the replica has sent all of it (or broke off): nothing to stop there
    cached_tokens: int | None = None  # kv_aware: the prompt tokens the router expects the replica to have cached
    sink: Sink | None = None  # where the rest of a stream arrives, if through the chunk channel (not `stream`)

    @property
    def key(self) -> tuple[str, str]:
        return self.model, self.backend

    def end(self) -> None:
        """The slot back, and the generation stopped upstream unless it is done."""
        if not self.upstream_done and self.stream is not None:
            self.stream.cancel()
        self.release()


@dataclass(eq=False)
class Exchange:
    kind: RequestKind
    quotas: Quotas | None  # the router replica's side of the ledger; None where no key is ever metered
    metrics: RouterMetrics
    access_log: AccessLog | None = None  # where its line goes as it closes; None: nowhere
    grant: Grant | None = None  # the API key's, when keys are on
    band: Band = ONE_BAND  # its priority class (priority.py)
    status: int = 200  # the HTTP status its client got
    started: float = field(default_factory=time.monotonic)
    body: dict[str, Any] = field(default_factory=dict)  # as parsed once (protocol.parse_request)
    size: int = 0  # the body's bytes, as it came
    requested: str = ""  # `model` as the client sent it: model, adapter, either @backend
    model: Model | None = None
    pinned: str | None = None  # the backend named with model@backend
    adapter: str | None = None
    unable: frozenset[str] = frozenset()  # backends that cannot honour the request
    meter: Meter | None = None  # a key's: what the answer costs
    admission: str | None = None  # the ledger's id of the request, for a key with limits
    delivery: Delivery | None = None  # the backend's answer, once one opened it
    closed: bool = False
    settlement: Any = None  # what the ledger confirms, for an answer it admitted itself (Quotas.settle)
    _last_resort: weakref.finalize | None = None

    @cached_property
    def prompt(self) -> str:
        """The prompt as one text (protocol.prompt_text), made once, when a routing policy asks for it."""
        return prompt_text(self.kind, self.body)

    @property
    def model_name(self) -> str:
        return self.model.name if self.model is not None else UNRESOLVED

    @property
    def share(self) -> tuple[str, float]:
        """Whose turn this request waits for at a full backend: the key's name and weight (fair_share.py)."""
        return (self.grant.name, self.grant.weight) if self.grant else ("", 1.0)

    async def admit(self) -> None:
        """A key's request: its cost metered from here on, and admitted by its limits (429 when over one)."""
        assert self.grant is not None and self.quotas is not None
        self.meter = Meter(Cost(estimate_prompt_tokens(self.size)), client_wants_usage=ask_for_usage(self.body))
        self.admission = await self.quotas.admit(self.grant.name, self.grant.limits, self.meter.cost.prompt_tokens)

    async def answered_whole(self) -> None:
        """A whole answer (the delivery's opening holds it): metered, closed, and settled before it goes out."""
        opening = self.delivery.opening
        if self.meter is not None:
            self.meter.whole(opening.status, opening.body)
        self.delivery.upstream_done = True
        self.close()
        await self.settled()

    def streamed(self, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        """The response body of a streamed answer: `chunks` (the relay), metered for a key, closing the
        exchange at their end, and as the last resort if the response is dropped without being iterated."""
        body = self._relay(self.meter.watch(chunks) if self.meter is not None else chunks)
        self._last_resort = weakref.finalize(body, self.close)
        return body

    async def _relay(self, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            self.close()
        await self.settled()  # a key's stream ends, for its client, once the ledger has its settlement

    def close(self, error: bool = False) -> None:
        """The request is over, however it ended (`error`: refused before any backend answered); acts once."""
        if self.closed:
            return
        self.closed = True
        if self._last_resort is not None:
            self._last_resort.detach()
        if self.delivery is not None:
            self.delivery.end()
        if self.access_log is not None:
            self._log_access()
        if self.grant is None or self.quotas is None:
            return
        # Answered: what the meter read. Ended before any engine answered: nothing generated, nothing read.
        cost = self.meter.cost if self.meter is not None and self.delivery is not None else Cost(0, error=error)
        self.metrics.key_usage(self.grant.name, self.model_name, self.band.name, cost.prompt_tokens,
                               cost.completion_tokens, cost.error)
        self.settlement = self.quotas.settle(self.grant.name, self.model_name, self.admission, cost, self.band.name)

    def _log_access(self) -> None:
        delivery = self.delivery
        self.access_log.write(
            f"POST {PATHS[self.kind]} {self.status} {time.monotonic() - self.started:.3f}s "
            f"model={self.requested or UNRESOLVED} backend={delivery.backend if delivery else '-'} "
            f"replica={delivery.opening.replica if delivery else '-'} key={self.grant.name if self.grant else '-'} "
            f"class={self.band.name}")

    async def settled(self) -> None:
        """Wait, a bounded while, until the ledger confirms the settlement `close` sent (if it sent one)."""
        if self.settlement is not None and self.quotas is not None:
            await self.quotas.settled(self.settlement)
