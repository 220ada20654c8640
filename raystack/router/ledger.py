"""The QuotaLedger: one small Ray actor per router application that keeps each limited API key's requests per
minute, requests at once, tokens per minute and token budgets per UTC day and month, for every replica of
the router together, and the usage book (usage.py) it writes to Ray's GCS every FLUSH_S.

A router replica asks it (through its client, quotas.py) before it forwards a request of a key that has
limits, and tells it what every keyed answer cost once it is over. A key far from its limits (at least half
of each left) is lent a share of what is left, for LEASE_S: a router replica admits from that lease without
asking. What is lent counts as used for every other replica, so the limits still hold together; near a
limit nothing is lent and every request asks. Token limits count the prompt's estimate when a request is
admitted, and the engine's usage when its answer ends.

The ledger belongs to the router replica that created it; if that replica goes, the ledger goes with it and
the next replica to ask creates a new one, which reads the book back (the per-minute windows start over). A
request that a router lost track of (its replica killed mid-answer) holds its concurrent slot at most until
router.request_timeout_s, the longest it may run.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from raystack.router.usage import Cost, GCSStore, UsageBook, day_start, month_start, next_day, next_month

logger = logging.getLogger("ray.serve")

WINDOW_S = 60.0  # the per-minute limits' window
FLUSH_S = 1.0  # the book is written at most this often: a ledger that dies loses at most this much
LEASE_S = 1.0  # how long a lease lasts; the router replica stops using it a little earlier
BUDGETS = {"tokens_per_day": (day_start, next_day), "tokens_per_month": (month_start, next_month)}  # UTC


class KeyLimits(BaseModel):
    """A key's limits (None: unlimited), named as the key file names them (auth.KeyEntry takes them from here),
    in the order they are checked: the first broken is the one a 429 names."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    concurrent_requests: int | None = Field(None, ge=1)
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1, description="prompt + completion tokens")
    tokens_per_day: int | None = Field(None, ge=1, description="a budget per UTC day")
    tokens_per_month: int | None = Field(None, ge=1, description="a budget per UTC month")

    def __bool__(self) -> bool:
        return any(getattr(self, limit) is not None for limit in LIMITS)


LIMITS = tuple(KeyLimits.model_fields)


@dataclass(frozen=True)
class OverLimit:
    """The ledger's answer to a request over one of its key's limits."""

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
              wall: float | None = None, replica: str = "", replicas: int = 1) -> OverLimit | dict[str, float]:
        """The request counted (its prompt's `estimate` among the key's tokens, a slot held), and the lease
        `replica` (one of `replicas` router replicas) may admit from for LEASE_S: what it may still take of
        each limit, empty near one; or the OverLimit: which limit, and when to retry."""
        now = time.monotonic() if now is None else now
        wall = time.time() if wall is None else wall
        self.leases.pop((replica, key), None)  # this replica's last lease: replaced by this answer
        recent, held, tokens = self._window(key, now)
        if limits.tokens_per_minute is not None and estimate > limits.tokens_per_minute:
            return OverLimit("tokens_per_minute", 0, too_large=estimate)
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
        for limit in LIMITS:  # the first limit broken is the one named
            value = getattr(limits, limit)
            if value is None:
                continue
            used = in_use(limit)
            left[limit] = value - used - lent.get(limit, 0) - cost_of(limit, estimate)
            if left[limit] < 0:
                return self._refusal(limit, recent, held, tokens, value, used + lent.get(limit, 0) + estimate,
                                     now, wall)
        self.record(key, request, estimate, now)
        # Far from every limit, a share of what is left (with every other replica's, half of it at most),
        # worth two requests like this one at least: near a limit every request asks, and is exact.
        lease = {limit: amount / (2 * replicas) if limit.startswith("tokens_") else amount // (2 * replicas)
                 for limit, amount in left.items()}
        if all(left[limit] >= getattr(limits, limit) / 2 and lease[limit] >= 2 * cost_of(limit, estimate)
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
                 value: int, wanted: float, now: float, wall: float) -> OverLimit:
        if limit == "requests_per_minute":
            return OverLimit(limit, recent[len(recent) - value] + WINDOW_S - now if len(recent) >= value else 1.0)
        if limit == "tokens_per_minute":
            running = _running(held)
            return OverLimit(limit, _tokens_free_in([t for t in tokens if id(t) not in running], wanted - value, now))
        if limit in BUDGETS:
            return OverLimit(limit, BUDGETS[limit][1](wall) - wall, budget=True)
        return OverLimit(limit, 1.0)

    def record(self, key: str, request: str, estimate: int = 0, now: float | None = None, replica: str = "") -> None:
        """Count an admitted request; one `replica` admitted from its lease is taken out of the lease."""
        now = time.monotonic() if now is None else now
        recent, held, tokens = self._window(key, now)
        recent.append(now)
        entry = [now, float(estimate)]
        tokens.append(entry)
        held[request] = _Held(now + self.hold_s, entry, estimate)
        self._spend(replica, key, lambda limit: cost_of(limit, estimate))

    def _spend(self, replica: str, key: str, cost) -> None:
        lease = self.leases.get((replica, key))
        if lease is not None:
            for limit in lease[1]:
                lease[1][limit] = max(0.0, lease[1][limit] - cost(limit))

    def settle(self, key: str, model: str, request: str | None, cost: Cost, now: float | None = None,
               wall: float | None = None, replica: str = "", priority: str = "-") -> None:
        """An answer is over: its slot back, its tokens counted as the engine reported them (and taken out
        of the token limits `replica`'s lease may still take), its usage booked under its priority class.
        `request`: its admission, None for a key without limits (only booked)."""
        now = time.monotonic() if now is None else now
        self._spend(replica, key, lambda limit: cost.completion_tokens if limit.startswith("tokens_") else 0)
        hold = self.in_flight.get(key, {}).pop(request, None) if request else None
        if hold is not None:
            hold.tokens[0], hold.tokens[1] = now, float(cost.tokens)
        self.book.add(key, model, cost, wall, priority)
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


def cost_of(limit: str, estimate: int) -> float:
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
