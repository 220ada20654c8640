"""Per-key request limits, shared by every replica of a router: requests per minute and requests at once.

A key's limits (auth.KeyEntry) are kept by one small Ray actor per router application, the QuotaLedger,
which every router replica asks before it forwards a request of a key that has limits, and tells when the
answer is over. Two router replicas therefore admit no more than the limit together. Keys without limits
never reach it: they cost nothing. The ledger belongs to the router replica that created it; if that
replica goes, the ledger goes with it and the next replica to ask creates a new one (the counts start
over, never stuck). A request that a router lost track of (its replica killed mid-answer) holds its
concurrent slot at most until router.request_timeout_s, the longest it may run.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

from raystack.protocol import OpenAIError

WINDOW_S = 60.0  # requests_per_minute's window


@dataclass(frozen=True)
class KeyLimits:
    requests_per_minute: int | None = None
    concurrent_requests: int | None = None

    def __bool__(self) -> bool:
        return self.requests_per_minute is not None or self.concurrent_requests is not None


class QuotaLedger:
    """Each limited key's recent admissions and requests in flight. `now` is the caller's clock only for
    tests of the windows; the routers leave it to the ledger's."""

    def __init__(self, hold_s: float):
        self.hold_s = hold_s  # a slot nobody released is freed after this (router.request_timeout_s)
        self.admitted: dict[str, deque[float]] = {}  # key name -> admission times within the window
        self.in_flight: dict[str, dict[str, float]] = {}  # key name -> request id -> when its slot lapses

    def admit(self, key: str, limits: KeyLimits, request: str, now: float | None = None) -> tuple[str, float] | None:
        """None, with the request counted and holding a slot; or (the limit it would break, seconds until it
        would not)."""
        now = time.monotonic() if now is None else now
        recent = self.admitted.setdefault(key, deque())
        while recent and recent[0] <= now - WINDOW_S:
            recent.popleft()
        held = self.in_flight.setdefault(key, {})
        for lapsed in [r for r, until in held.items() if until <= now]:
            del held[lapsed]
        if limits.concurrent_requests is not None and len(held) >= limits.concurrent_requests:
            return "concurrent_requests", 1.0
        if limits.requests_per_minute is not None and len(recent) >= limits.requests_per_minute:
            return "requests_per_minute", recent[len(recent) - limits.requests_per_minute] + WINDOW_S - now
        recent.append(now)
        held[request] = now + self.hold_s
        return None

    def release(self, key: str, request: str) -> None:
        self.in_flight.get(key, {}).pop(request, None)


class Quotas:
    """A router replica's side of the ledger: admit or 429, and release once."""

    def __init__(self, app_name: str, hold_s: float):
        self.name = f"raystack-quotas-{app_name}"
        self.hold_s = hold_s
        self.ledger: Any = None

    def _ledger(self) -> Any:
        import ray

        if self.ledger is None:
            # Not detached: it goes with the router replica that created it (and so with the application).
            self.ledger = ray.remote(num_cpus=0, max_restarts=0)(QuotaLedger).options(
                name=self.name, get_if_exists=True).remote(self.hold_s)
        return self.ledger

    async def admit(self, key: str, limits: KeyLimits) -> str | None:
        """The request's id in the ledger (release it when the answer is over), None for a key without
        limits; OpenAIError 429 naming the limit, with Retry-After, when it is over one."""
        if not limits:
            return None
        import ray

        request = uuid.uuid4().hex
        try:
            refused = await self._ledger().admit.remote(key, limits, request)
        except ray.exceptions.RayActorError:  # its router replica went: a new ledger, counts start over
            self.ledger = None
            refused = await self._ledger().admit.remote(key, limits, request)
        if refused is not None:
            limit, wait_s = refused
            retry = max(1, int(wait_s + 0.999))
            raise OpenAIError(
                429, f"Rate limit reached for key `{key}`: {limit} {getattr(limits, limit)}. Retry in {retry} s, "
                f"or ask the operator for a higher limit.", code="rate_limit_exceeded", param=limit,
                headers={"Retry-After": str(retry)})
        return request

    def release(self, key: str, request: str | None) -> None:
        if request is not None and self.ledger is not None:
            self.ledger.release.remote(key, request)  # not awaited: nothing waits on it
