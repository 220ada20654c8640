"""A router replica's side of its application's QuotaLedger (ledger.py): admit a keyed request (from a lease,
or asking the ledger) or refuse it with a 429 naming the limit; settle its answer once.

An answer the ledger admitted (near a limit) is settled before its end reaches the client: the key's next
request finds its slot free and its tokens counted, whichever router replica it reaches. Admissions from a
lease and their settlements are told to the ledger in batches, every BATCH_S.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from raystack.protocol import OpenAIError
from raystack.router.ledger import LEASE_S, KeyLimits, OverLimit, QuotaLedger, cost_of
from raystack.router.usage import Cost

logger = logging.getLogger("ray.serve")

BATCH_S = 0.05  # a router replica tells the ledger what it admitted and settled in one call this often
SETTLE_WAIT_S = 2.0  # the longest an answer's end waits for the ledger to confirm its settlement


@dataclass
class Lease:
    """What this router replica may admit of a key without asking the ledger, until `until` (its loop time)."""

    limits: KeyLimits
    until: float
    left: dict[str, float]

    def take(self, limits: KeyLimits, estimate: int, now: float) -> bool:
        if limits != self.limits or now >= self.until or not self.left:
            return False
        if any(amount < cost_of(limit, estimate) for limit, amount in self.left.items()):
            return False
        for limit in self.left:
            self.left[limit] -= cost_of(limit, estimate)
        return True


class Quotas:
    """A router replica's side of the ledger: admit (from a lease, or asking) or 429, settle once."""

    def __init__(self, app_name: str, hold_s: float, replica: str = ""):
        self.app = app_name
        self.name = f"raystack-quotas-{app_name}"
        self.hold_s = hold_s
        self.replica = replica
        self.replicas = 1  # of the router, sharing the ledger (the Router counts them)
        self.ledger: Any = None
        self.leases: dict[str, Lease] = {}  # key name -> its lease
        # What to tell the ledger (admissions from leases, settlements): one call every BATCH_S, since even
        # an actor call not awaited costs its caller about a millisecond.
        self.outbox: list[tuple[str, tuple, dict]] = []
        self.leased: set[str] = set()  # requests admitted from a lease, not yet settled

    def _ledger(self) -> Any:
        import ray

        if self.ledger is None:
            # Not detached: it goes with the router replica that created it (and so with the application).
            self.ledger = ray.remote(num_cpus=0, max_restarts=0)(QuotaLedger).options(
                name=self.name, get_if_exists=True).remote(self.app, self.hold_s)
        return self.ledger

    async def admit(self, key: str, limits: KeyLimits, estimate: int) -> str | None:
        """The request's id in the ledger (settle it when the answer is over), None for a key without
        limits; OpenAIError 429 naming the limit, with Retry-After, when it is over one (insufficient_quota
        for a budget)."""
        if not limits:
            return None
        import asyncio

        import ray

        request = uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        lease = self.leases.get(key)
        if lease is not None and lease.take(limits, estimate, loop.time()):
            self.leased.add(request)
            self._tell("record", key, request, estimate, replica=self.replica)
            return request
        self._send()  # what this replica told so far reaches the ledger first (one caller's calls keep their order)
        asked = loop.time()
        args = dict(replica=self.replica, replicas=self.replicas)
        try:
            answer = await self._ledger().admit.remote(key, limits, request, estimate, **args)
        except ray.exceptions.RayActorError:  # its router replica went: a new ledger, counts start over
            self.ledger = None
            answer = await self._ledger().admit.remote(key, limits, request, estimate, **args)
        if isinstance(answer, OverLimit):
            self.leases.pop(key, None)
            raise over_limit_error(key, limits, answer)
        # Used until a little before the ledger's own end of it (counted from when it was asked).
        self.leases[key] = Lease(limits, asked + 0.8 * LEASE_S, answer)
        return request

    def settle(self, key: str, model: str, request: str | None, cost: Cost, priority: str = "-") -> Any:
        """The answer's slot back and its tokens counted. An answer the ledger admitted (near a limit) is
        settled at once: the ObjectRef to await before the answer's end reaches its client, whose next
        request must find its slot free and its tokens spent. One admitted from a lease (far from every
        limit) is batched, and None returned. The tokens it generated come off this replica's lease. The
        usage book keeps it under `priority`, the request's class."""
        lease = self.leases.get(key)
        if lease is not None:
            for limit in lease.left:
                if limit.startswith("tokens_"):
                    lease.left[limit] -= cost.completion_tokens
        self._tell("settle", key, model, request, cost, replica=self.replica, priority=priority)
        if request is None or request in self.leased:
            self.leased.discard(request)
            return None
        return self._send()

    async def settled(self, told: Any) -> None:
        """Wait, a bounded while, until the ledger has applied a settlement `settle` sent at once."""
        import asyncio

        if told is None:
            return
        try:
            await asyncio.wait_for(told, SETTLE_WAIT_S)
        except Exception as err:  # the ledger gone or slow: the answer is not held back for it
            logger.warning("settlement not confirmed by the quota ledger: %r", err)

    def _tell(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Queued for the ledger; sent with whatever else comes within BATCH_S. (What an admission from a
        lease adds, the lease has already lent: the ledger's counts never fall short meanwhile.)"""
        import asyncio

        self.outbox.append((method, args, kwargs))
        if len(self.outbox) == 1:
            try:
                asyncio.get_running_loop().call_later(BATCH_S, self._send)
            except RuntimeError:  # called outside the router's loop (a collected answer): at once
                self._send()

    def _send(self) -> Any:
        told, self.outbox = self.outbox, []
        return self._ledger().apply.remote(told) if told else None

    async def flush(self) -> None:
        """Have the ledger write its book (the router calls this every few seconds); a ledger that died is
        replaced at the next use, and reads the book back."""
        import ray

        if self.ledger is not None:
            try:
                await self.ledger.flush.remote()
            except ray.exceptions.RayActorError:
                self.ledger = None
            except Exception as err:  # GCS unreachable for a moment, say: the book is written next time
                logger.warning("usage book not written: %r", err)


def over_limit_error(key: str, limits: KeyLimits, refused: OverLimit) -> OpenAIError:
    value = getattr(limits, refused.limit)
    if refused.too_large is not None:
        return OpenAIError(
            429, f"Request too large for key `{key}`: its prompt is about {refused.too_large} tokens, over "
            f"tokens_per_minute {value}. Send a shorter prompt, or ask the operator for a higher limit.",
            code="rate_limit_exceeded", param=refused.limit)
    retry = max(1, int(refused.retry_after_s + 0.999))
    headers = {"Retry-After": str(retry)}
    if refused.budget:
        period = "day" if refused.limit == "tokens_per_day" else "month"
        return OpenAIError(
            429, f"Key `{key}` has used its token budget for this {period} ({refused.limit} {value}); it "
            f"renews in {retry // 3600} h {retry % 3600 // 60} min (UTC). Ask the operator for a larger budget.",
            code="insufficient_quota", param=refused.limit, headers=headers, type="insufficient_quota")
    return OpenAIError(
        429, f"Rate limit reached for key `{key}`: {refused.limit} {value}. Retry in {retry} s, or ask the "
        f"operator for a higher limit.", code="rate_limit_exceeded", param=refused.limit, headers=headers)
