"""Per-key limits and usage, shared by every replica of a router: requests per minute, requests at once,
tokens per minute, and token budgets per UTC day and month.

One small Ray actor per router application, the QuotaLedger, keeps them. A router replica asks it before
it forwards a request of a key that has limits (keys without limits never wait for it), and tells it
what every keyed answer cost once it is over. Two router replicas therefore admit no more than a limit
together. An answer the ledger admitted is settled before its end reaches the client: the key's next
request finds its slot free and its tokens counted, whichever router replica it reaches.

A key far from its limits (at least half of each left) is lent a share of what is left, for LEASE_S: the
router replica admits from that lease without asking, and tells the ledger after, batched every BATCH_S
with the settlements of such answers. What is lent counts as used for every other replica, so the limits
still hold together; near a limit nothing is lent and every request asks. Token limits count the
prompt's estimate when a request is admitted, and the engine's usage (usage.py) when its answer ends:
streamed, whole, or cut by the client leaving.

The ledger keeps the usage book (usage.py) and writes it to Ray's GCS every FLUSH_S: budgets and
`raystack usage` outlive it. The ledger belongs to the router replica that created it; if that replica
goes, the ledger goes with it and the next replica to ask creates a new one, which reads the book back
(the per-minute windows start over). A request that a router lost track of (its replica killed
mid-answer) holds its concurrent slot at most until router.request_timeout_s, the longest it may run.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

from raystack.protocol import OpenAIError
from raystack.router.usage import Cost, GCSStore, UsageBook, day_start, month_start, next_day, next_month

logger = logging.getLogger("ray.serve")

WINDOW_S = 60.0  # the per-minute limits' window
FLUSH_S = 1.0  # the book is written at most this often: a ledger that dies loses at most this much
LEASE_S = 1.0  # how long a lease lasts; the router replica stops using it a little earlier
BATCH_S = 0.05  # a router replica tells the ledger what it admitted and settled in one call this often
SETTLE_WAIT_S = 2.0  # the longest an answer's end waits for the ledger to confirm its settlement
BUDGETS = {"tokens_per_day": (day_start, next_day), "tokens_per_month": (month_start, next_month)}  # UTC
LIMIT_ORDER = ("concurrent_requests", "requests_per_minute", "tokens_per_minute", *BUDGETS)


@dataclass(frozen=True)
class KeyLimits:
    requests_per_minute: int | None = None
    concurrent_requests: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None

    def __bool__(self) -> bool:
        return any(value is not None for value in vars(self).values())


@dataclass(frozen=True)
class Refusal:
    limit: str  # the KeyLimits field
    retry_after_s: float
    budget: bool = False  # a budget (insufficient_quota), not a rate
    too_large: int | None = None  # the request alone exceeds the limit: its estimate


@dataclass
class _Held:
    until: float  # when the slot lapses if nobody releases it
    tokens: list[float]  # its entry in the key's token window: [time, tokens]
    estimate: int


class QuotaLedger:
    """Each limited key's recent admissions, requests in flight and tokens, and the usage book. `now` is
    the caller's clock only for tests of the windows; the routers leave it to the ledger's."""

    def __init__(self, app: str, hold_s: float, store: Any = "gcs"):
        self.hold_s = hold_s  # a slot nobody released is freed after this (router.request_timeout_s)
        self.admitted: dict[str, deque[float]] = {}  # key name -> admission times within the window
        self.in_flight: dict[str, dict[str, _Held]] = {}  # key name -> request id -> its hold
        self.tokens: dict[str, list[list[float]]] = {}  # key name -> [time, tokens] within the window
        self.leases: dict[tuple[str, str], tuple[float, dict[str, float]]] = {}  # (replica, key) -> (until, left)
        self.book = UsageBook(app, GCSStore() if store == "gcs" else store)
        self.flushed = float("-inf")  # the first answer's usage is written at once

    def _window(self, key: str, now: float) -> tuple[deque[float], dict[str, _Held], list[list[float]]]:
        recent = self.admitted.setdefault(key, deque())
        while recent and recent[0] <= now - WINDOW_S:
            recent.popleft()
        held = self.in_flight.setdefault(key, {})
        for lapsed in [r for r, h in held.items() if h.until <= now]:
            del held[lapsed]
        tokens = self.tokens.setdefault(key, [])
        running = _running(held)
        tokens[:] = [t for t in tokens if t[0] > now - WINDOW_S or id(t) in running]
        return recent, held, tokens

    def admit(self, key: str, limits: KeyLimits, request: str, estimate: int = 0, now: float | None = None,
              wall: float | None = None, replica: str = "", replicas: int = 1) -> Refusal | dict[str, float]:
        """The request counted (its prompt's `estimate` among the key's tokens, a slot held), and the lease
        `replica` (one of `replicas` router replicas) may admit from for LEASE_S: what it may still take of
        each limit, empty near one; or the Refusal: which limit, and when to retry."""
        now = time.monotonic() if now is None else now
        wall = time.time() if wall is None else wall
        self.leases.pop((replica, key), None)  # this replica's last lease: replaced by this answer
        recent, held, tokens = self._window(key, now)
        if limits.tokens_per_minute is not None and estimate > limits.tokens_per_minute:
            return Refusal("tokens_per_minute", 0, too_large=estimate)
        lent = self._lent(key, now)

        def in_use(limit: str) -> float:  # what the key holds of `limit` now (a budget: the book read only then)
            if limit == "concurrent_requests":
                return len(held)
            if limit == "requests_per_minute":
                return len(recent)
            if limit == "tokens_per_minute":
                return sum(t[1] for t in tokens)
            return self.book.tokens_since(key, BUDGETS[limit][0](wall), wall) + sum(h.estimate for h in held.values())

        left = {}
        for limit in LIMIT_ORDER:  # the first limit broken is the one named
            value = getattr(limits, limit)
            if value is None:
                continue
            used = in_use(limit)
            left[limit] = value - used - lent.get(limit, 0) - _cost(limit, estimate)
            if left[limit] < 0:
                return self._refusal(limit, recent, held, tokens, value, used + lent.get(limit, 0) + estimate,
                                     now, wall)
        self.record(key, request, estimate, now)
        # Far from every limit, a share of what is left (with every other replica's, half of it at most),
        # worth two requests like this one at least: near a limit every request asks, and is exact.
        lease = {limit: amount / (2 * replicas) if limit.startswith("tokens_") else amount // (2 * replicas)
                 for limit, amount in left.items()}
        if all(left[limit] >= getattr(limits, limit) / 2 and lease[limit] >= 2 * _cost(limit, estimate)
               for limit in left):
            self.leases[replica, key] = (now + LEASE_S, lease)
            return lease
        return {}

    def _lent(self, key: str, now: float) -> dict[str, float]:
        """What the key's live leases may still take, per limit."""
        lent: dict[str, float] = {}
        for (replica, leased), (until, left) in list(self.leases.items()):
            if until <= now:
                del self.leases[replica, leased]
            elif leased == key:
                for limit, amount in left.items():
                    lent[limit] = lent.get(limit, 0) + amount
        return lent

    def _refusal(self, limit: str, recent: deque[float], held: dict[str, _Held], tokens: list[list[float]],
                 value: int, wanted: float, now: float, wall: float) -> Refusal:
        if limit == "requests_per_minute":
            return Refusal(limit, recent[len(recent) - value] + WINDOW_S - now if len(recent) >= value else 1.0)
        if limit == "tokens_per_minute":
            running = _running(held)
            return Refusal(limit, _tokens_free_in([t for t in tokens if id(t) not in running], wanted - value, now))
        if limit in BUDGETS:
            return Refusal(limit, BUDGETS[limit][1](wall) - wall, budget=True)
        return Refusal(limit, 1.0)

    def record(self, key: str, request: str, estimate: int = 0, now: float | None = None, replica: str = "") -> None:
        """Count an admitted request; one `replica` admitted from its lease is taken out of the lease."""
        now = time.monotonic() if now is None else now
        recent, held, tokens = self._window(key, now)
        recent.append(now)
        entry = [now, float(estimate)]
        tokens.append(entry)
        held[request] = _Held(now + self.hold_s, entry, estimate)
        self._spend(replica, key, lambda limit: _cost(limit, estimate))

    def _spend(self, replica: str, key: str, cost) -> None:
        lease = self.leases.get((replica, key))
        if lease is not None:
            for limit in lease[1]:
                lease[1][limit] = max(0.0, lease[1][limit] - cost(limit))

    def settle(self, key: str, model: str, request: str | None, cost: Cost, now: float | None = None,
               wall: float | None = None, replica: str = "") -> None:
        """An answer is over: its slot back, its tokens counted as the engine reported them (and taken out
        of the token limits `replica`'s lease may still take), its usage booked. `request`: its admission,
        None for a key without limits (only booked)."""
        now = time.monotonic() if now is None else now
        self._spend(replica, key, lambda limit: cost.completion_tokens if limit.startswith("tokens_") else 0)
        hold = self.in_flight.get(key, {}).pop(request, None) if request else None
        if hold is not None:
            hold.tokens[0], hold.tokens[1] = now, float(cost.tokens)
        self.book.add(key, model, cost, wall)
        if now - self.flushed >= FLUSH_S:
            self.flush(now)

    def apply(self, told: list[tuple[str, tuple, dict]]) -> None:
        """A router replica's batch of `record` and `settle` calls, in its order."""
        for method, args, kwargs in told:
            if method in ("record", "settle"):
                getattr(self, method)(*args, **kwargs)

    def flush(self, now: float | None = None) -> None:
        self.flushed = time.monotonic() if now is None else now
        self.book.flush()


def _running(held: dict[str, _Held]) -> set[int]:
    """The token-window entries of answers still running (by identity): they stay until they settle."""
    return {id(h.tokens) for h in held.values()}


def _cost(limit: str, estimate: int) -> float:
    """What one request takes of `limit`: itself, or its prompt's tokens."""
    return estimate if limit.startswith("tokens_") else 1


def _tokens_free_in(settled: list[list[float]], excess: float, now: float) -> float:
    """Seconds until `excess` tokens of `settled` answers have left the window (a running answer's stay)."""
    freed = 0.0
    for t, count in sorted(settled):
        freed += count
        if freed >= excess:
            return max(t + WINDOW_S - now, 1.0)
    return WINDOW_S


@dataclass
class Lease:
    """What this router replica may admit of a key without asking the ledger, until `until` (its loop time)."""

    limits: KeyLimits
    until: float
    left: dict[str, float]

    def take(self, limits: KeyLimits, estimate: int, now: float) -> bool:
        if limits != self.limits or now >= self.until or not self.left:
            return False
        if any(amount < _cost(limit, estimate) for limit, amount in self.left.items()):
            return False
        for limit in self.left:
            self.left[limit] -= _cost(limit, estimate)
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
        if isinstance(answer, Refusal):
            self.leases.pop(key, None)
            raise _refusal_error(key, limits, answer)
        # Used until a little before the ledger's own end of it (counted from when it was asked).
        self.leases[key] = Lease(limits, asked + 0.8 * LEASE_S, answer)
        return request

    def settle(self, key: str, model: str, request: str | None, cost: Cost) -> Any:
        """The answer's slot back and its tokens counted. An answer the ledger admitted (near a limit) is
        settled at once: the ObjectRef to await before the answer's end reaches its client, whose next
        request must find its slot free and its tokens spent. One admitted from a lease (far from every
        limit) is batched, and None returned. The tokens it generated come off this replica's lease."""
        lease = self.leases.get(key)
        if lease is not None:
            for limit in lease.left:
                if limit.startswith("tokens_"):
                    lease.left[limit] -= cost.completion_tokens
        self._tell("settle", key, model, request, cost, replica=self.replica)
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


def _refusal_error(key: str, limits: KeyLimits, refused: Refusal) -> OpenAIError:
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
