"""Per-key limits and usage, shared by every replica of a router: requests per minute, requests at once,
tokens per minute, and token budgets per UTC day and month.

One small Ray actor per router application, the QuotaLedger, keeps them. A router replica asks it before
it forwards a request of a key that has limits (keys without limits never wait for it), and tells it
what every keyed answer cost once it is over (not awaited). Two router replicas therefore admit no more
than a limit together. Token limits count the prompt's estimate when a request is admitted, and the
engine's usage (usage.py) when its answer ends: streamed, whole, or cut by the client leaving.

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
from raystack.serving.usage import Cost, GCSStore, UsageBook, day_start, month_start, next_day, next_month

logger = logging.getLogger("ray.serve")

WINDOW_S = 60.0  # the per-minute limits' window
FLUSH_S = 1.0  # the book is written at most this often: a ledger that dies loses at most this much
BUDGETS = {"tokens_per_day": (day_start, next_day), "tokens_per_month": (month_start, next_month)}  # UTC


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
    key: str
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
        self.book = UsageBook.load(app, GCSStore() if store == "gcs" else store) if store else UsageBook(app)
        self.flushed = float("-inf")  # the first answer's usage is written at once

    def _window(self, key: str, now: float) -> tuple[deque[float], dict[str, _Held], list[list[float]]]:
        recent = self.admitted.setdefault(key, deque())
        while recent and recent[0] <= now - WINDOW_S:
            recent.popleft()
        held = self.in_flight.setdefault(key, {})
        for lapsed in [r for r, h in held.items() if h.until <= now]:
            del held[lapsed]
        tokens = self.tokens.setdefault(key, [])
        tokens[:] = [t for t in tokens if t[0] > now - WINDOW_S or any(h.tokens is t for h in held.values())]
        return recent, held, tokens

    def admit(self, key: str, limits: KeyLimits, request: str, estimate: int = 0, now: float | None = None,
              wall: float | None = None) -> Refusal | None:
        """None, with the request counted (its prompt's `estimate` among the key's tokens) and holding a
        slot; or the Refusal: which limit, and when to retry."""
        now = time.monotonic() if now is None else now
        wall = time.time() if wall is None else wall
        recent, held, tokens = self._window(key, now)
        if limits.concurrent_requests is not None and len(held) >= limits.concurrent_requests:
            return Refusal("concurrent_requests", 1.0)
        if limits.requests_per_minute is not None and len(recent) >= limits.requests_per_minute:
            return Refusal("requests_per_minute", recent[len(recent) - limits.requests_per_minute] + WINDOW_S - now)
        if limits.tokens_per_minute is not None:
            if estimate > limits.tokens_per_minute:
                return Refusal("tokens_per_minute", 0, too_large=estimate)
            used = sum(t[1] for t in tokens)
            if used + estimate > limits.tokens_per_minute:
                running = [h.tokens for h in held.values()]
                return Refusal("tokens_per_minute", _tokens_free_in(
                    [t for t in tokens if not any(t is r for r in running)], used + estimate - limits.tokens_per_minute,
                    now))
        pending = sum(h.estimate for h in held.values())
        for limit, (starts, renews) in BUDGETS.items():
            budget = getattr(limits, limit)
            if budget is not None and self.book.tokens_since(key, starts(wall), wall) + pending + estimate > budget:
                return Refusal(limit, renews(wall) - wall, budget=True)
        recent.append(now)
        entry = [now, float(estimate)]
        tokens.append(entry)
        held[request] = _Held(key, now + self.hold_s, entry, estimate)
        return None

    def settle(self, key: str, model: str, request: str | None, cost: Cost, now: float | None = None,
               wall: float | None = None) -> None:
        """An answer is over: its slot back, its tokens counted as the engine reported them, its usage
        booked. `request`: its admission, None for a key without limits (only booked)."""
        now = time.monotonic() if now is None else now
        hold = self.in_flight.get(key, {}).pop(request, None) if request else None
        if hold is not None:
            hold.tokens[0], hold.tokens[1] = now, float(cost.tokens)
        self.book.add(key, model, cost, wall)
        if now - self.flushed >= FLUSH_S:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        self.flushed = time.monotonic() if now is None else now
        self.book.flush()


def _tokens_free_in(settled: list[list[float]], excess: float, now: float) -> float:
    """Seconds until `excess` tokens of `settled` answers have left the window (a running answer's stay)."""
    freed = 0.0
    for t, count in sorted(settled):
        freed += count
        if freed >= excess:
            return max(t + WINDOW_S - now, 1.0)
    return WINDOW_S


class Quotas:
    """A router replica's side of the ledger: admit or 429, settle once."""

    def __init__(self, app_name: str, hold_s: float):
        self.app = app_name
        self.name = f"raystack-quotas-{app_name}"
        self.hold_s = hold_s
        self.ledger: Any = None

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
        import ray

        request = uuid.uuid4().hex
        try:
            refused = await self._ledger().admit.remote(key, limits, request, estimate)
        except ray.exceptions.RayActorError:  # its router replica went: a new ledger, counts start over
            self.ledger = None
            refused = await self._ledger().admit.remote(key, limits, request, estimate)
        if refused is not None:
            raise _refusal_error(key, limits, refused)
        return request

    def settle(self, key: str, model: str, request: str | None, cost: Cost) -> None:
        """Not awaited: nothing waits on it. A ledger that died meanwhile is noticed by `flush`."""
        self._ledger().settle.remote(key, model, request, cost)

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
