"""Fair share of a full backend: the slots a router replica may fill go to the waiting requests of each API
key in turn, by weight, not first come first served, so one key's burst cannot starve another key's
single request.

Each router replica keeps a FairGate per backend. Its capacity is the backend's running replicas times
their max_ongoing_requests, divided among the router replicas: what this replica may have in flight there.
Under it, a request goes straight on. At it, requests wait in a queue per key, and each freed slot goes to
the key whose next turn comes first in virtual time (start-time fair queuing): a key of weight w advances
its clock by 1/w per admission, and a key that was idle starts at the current clock, so it neither banks
turns while idle nor waits behind a busy key's backlog. Without API keys every request is one key: first
come first served, as before.

While a backend has no running replica (scaling from zero) the gate stands aside: Serve's own queue holds
the requests, where its autoscaler sees them. Requests admitted keep the replicas at max_ongoing_requests,
which is what Serve's autoscaler counts to add replicas; a replica added raises the capacity within
PUMP_S.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Callable

PUMP_S = 0.5  # how often waiters look again at a capacity that may have grown (replicas added)


class GateFull(Exception):
    """As many requests wait for the backend as its max_queued_requests allows."""


class FairGate:
    def __init__(self, capacity: Callable[[], int | None] = lambda: None, max_waiting: int = 0):
        """`capacity`: this router replica's slots at the backend now, None while unknown or no replica
        runs (then nothing waits here); `max_waiting`: the backend's max_queued_requests."""
        self.capacity = capacity
        self.max_waiting = max_waiting
        self.in_use = 0
        self.waiting: dict[str, deque[tuple[asyncio.Future, float]]] = {}  # key -> its waiters, in order
        self.turn: dict[str, float] = {}  # key -> the virtual time of its next admission
        self.clock = 0.0  # the virtual time of the last admission

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    def _free(self) -> bool:
        capacity = self.capacity()
        return capacity is None or self.in_use < capacity

    def _admit(self, key: str, weight: float) -> None:
        start = max(self.turn.get(key, 0.0), self.clock)
        self.clock = start
        self.turn[key] = start + 1 / weight
        self.in_use += 1

    async def acquire(self, key: str, weight: float, timeout_s: float) -> None:
        """A slot for a request of `key` (weight > 0); TimeoutError after `timeout_s` waiting; GateFull when
        max_queued_requests wait already."""
        if self._free() and not self.queued:
            self._admit(key, weight)
            return
        if self.queued >= self.max_waiting:
            raise GateFull()
        loop = asyncio.get_running_loop()
        ticket = loop.create_future()
        self.waiting.setdefault(key, deque()).append((ticket, weight))
        deadline = loop.time() + timeout_s
        try:
            while not ticket.done():
                self.pump()
                left = deadline - loop.time()
                if left <= 0:
                    raise TimeoutError()
                await asyncio.wait({ticket}, timeout=min(PUMP_S, left))
        except BaseException:
            if ticket.done():  # admitted as it gave up: the slot goes back
                self.release()
            else:
                ticket.cancel()
                self._forget(key, ticket)
            raise

    def _forget(self, key: str, ticket: asyncio.Future) -> None:
        queue = self.waiting.get(key)
        if queue is not None:
            self.waiting[key] = deque(entry for entry in queue if entry[0] is not ticket)
            if not self.waiting[key]:
                del self.waiting[key]

    def release(self) -> None:
        self.in_use -= 1
        self.pump()

    def pump(self) -> None:
        """Hand free slots to the waiting keys whose turn comes first."""
        while self.waiting and self._free():
            key = min(self.waiting, key=lambda k: max(self.turn.get(k, 0.0), self.clock))
            ticket, weight = self.waiting[key].popleft()
            if not self.waiting[key]:
                del self.waiting[key]
            if ticket.done():  # gave up meanwhile
                continue
            self._admit(key, weight)
            ticket.set_result(None)
