"""Who gets a full backend's next slot: priority classes in order, and within a class each API key in turn,
by weight, not first come first served, so neither batch work nor one key's burst makes a chat user wait.

Each router replica keeps a FairGate per backend. Its capacity is the backend's running replicas times
their max_ongoing_requests, divided among the router replicas: what this replica may have in flight there.
Under it, a request goes straight on. At it, requests wait in their class's band (config/priority.py), a
queue per key; each freed slot goes to the most urgent band with a waiter, and in it to the key whose next
turn comes first in virtual time (start-time fair queuing): a key of weight w advances its clock by 1/w per
admission, and a key that was idle starts at the current clock, so it neither banks turns while idle nor
waits behind a busy key's backlog. Without API keys and classes every request is one key in one band:
first come first served.

A band holds at most its `max_share` of the backend's slots at once, counted against the engine's running
limit where that is lower than max_ongoing_requests: vLLM never preempts a running request to start a more
urgent one at max_num_seqs (only when KV blocks run out, vllm#40004), so the slots a lower band leaves free
are what lets an interactive request start at once while batch work runs. A sheddable band is refused
first when the backend saturates: a sheddable request arriving while a request of another class waits is
refused at once, and those already waiting are refused as soon as one starts waiting (429 and Retry-After,
by the Forwarder, unless another backend of the model takes them). A full queue makes room for a more urgent
arrival by refusing the newest sheddable waiter. A band's queue_timeout_s bounds its wait (then 503).

While a backend has no running replica (scaling from zero) the gate stands aside: Serve's own queue holds
the requests, where its autoscaler sees them. Requests admitted keep the replicas at max_ongoing_requests,
which is what Serve's autoscaler counts to add replicas; a replica added raises the capacity within PUMP_S.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable

from pydantic import ConfigDict

from raystack.config.priority import PriorityClass

PUMP_S = 0.5  # how often waiters look again at a capacity that may have grown (replicas added)


class Band(PriorityClass):
    """A priority class as the gate serves it: the class, and its rank (0 is served first)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = 0


ONE_BAND = Band(name="standard")  # every request of a gate that knows no classes


class GateFull(Exception):
    """No place in the backend's queue for the request: `reason` says why (queue_full, class_queue_full, or
    shed); another backend of the model may still take it."""

    def __init__(self, reason: str = "queue_full"):
        super().__init__(reason)
        self.reason = reason


class QueueTimeout(Exception):
    """The request waited its band's queue_timeout_s for a slot."""


@dataclass(eq=False)
class _Waiter:
    ticket: asyncio.Future  # done with None when admitted, with GateFull when refused from the queue
    key: str
    weight: float
    band: Band
    order: int  # of arrival at this gate


class FairGate:
    def __init__(self, capacity: Callable[[], int | None] = lambda: None, max_waiting: int = 0,
                 slots: Callable[[], int | None] | None = None,
                 observe: Callable[[Band, int], None] = lambda band, queued: None):
        """`capacity`: this router replica's slots at the backend now, None while unknown or no replica
        runs (then nothing waits here); `max_waiting`: the backend's max_queued_requests; `slots`: the slots
        a band's max_share is a share of (default: the capacity); `observe`: told a band's queue length
        whenever it changes."""
        self.capacity = capacity
        self.slots = slots or capacity
        self.max_waiting = max_waiting
        self.observe = observe
        self.in_use = 0
        self.band_in_use: Counter[int] = Counter()  # rank -> slots its requests hold
        self.waiting: dict[int, dict[str, deque[_Waiter]]] = {}  # rank -> key -> its waiters, in order
        self.bands: dict[int, Band] = {}  # rank -> the band, as its waiters gave it
        self.turn: dict[tuple[int, str], float] = {}  # (rank, key) -> the virtual time of its next admission
        self.clock: dict[int, float] = {}  # rank -> the virtual time of its last admission
        self.queued = 0
        self.arrivals = 0  # requests that had to queue, ever: their order

    def _band_queued(self, rank: int) -> int:
        return sum(len(q) for q in self.waiting.get(rank, {}).values())

    def _full(self) -> bool:
        """Every slot in use (never while the capacity is unknown: then nothing waits here)."""
        capacity = self.capacity()
        return capacity is not None and self.in_use >= capacity

    def _room_for(self, band: Band) -> bool:
        if self._full():
            return False
        if band.max_share < 1 and (slots := self.slots() or self.capacity()) is not None:
            return self.band_in_use[band.rank] < max(1, int(band.max_share * slots))
        return True

    def _admit(self, key: str, weight: float, band: Band) -> None:
        start = max(self.turn.get((band.rank, key), 0.0), self.clock.get(band.rank, 0.0))
        self.clock[band.rank] = start
        self.turn[band.rank, key] = start + 1 / weight
        self.in_use += 1
        self.band_in_use[band.rank] += 1

    async def acquire(self, key: str, weight: float, timeout_s: float, band: Band = ONE_BAND) -> None:
        """A slot for a request of `key` (weight > 0) in `band`, to give back with release(band).
        TimeoutError after `timeout_s` waiting, QueueTimeout after the band's queue_timeout_s if that is
        shorter; GateFull when it may not wait here (its reason: a full queue, its band's full queue, or
        shed: a sheddable request while the backend is saturated), also from the queue."""
        if not self.queued and self._room_for(band):
            self._admit(key, weight, band)
            return
        self._make_room(band)
        self.arrivals += 1
        waiter = _Waiter(asyncio.get_running_loop().create_future(), key, weight, band, self.arrivals)
        self._enqueue(waiter)
        self.pump()
        if not waiter.ticket.done() and not band.sheddable and self._full():
            self._shed_waiting()  # saturated: the sheddable bands are refused before this request waits
        loop = asyncio.get_running_loop()
        ttl = band.queue_timeout_s
        bound, timeout = (ttl, QueueTimeout) if ttl is not None and ttl < timeout_s else (timeout_s, TimeoutError)
        deadline = loop.time() + bound
        try:
            while not waiter.ticket.done():
                left = deadline - loop.time()
                if left <= 0:
                    raise timeout()
                await asyncio.wait({waiter.ticket}, timeout=min(PUMP_S, left))
                self.pump()
            waiter.ticket.result()  # GateFull if it was refused from the queue
        except BaseException:
            ticket = waiter.ticket
            if ticket.done() and not ticket.cancelled() and ticket.exception() is None:
                self.release(band)  # admitted as it gave up: the slot goes back
            elif not ticket.done():
                ticket.cancel()
                self._forget(waiter)
            raise

    def _make_room(self, band: Band) -> None:
        """Refuse `band`'s request a place (GateFull), or make one for it: a sheddable request while one
        of another class waits is shed; a full queue refuses the newest waiter of a less urgent sheddable
        band, if any, in its place."""
        if band.sheddable and self._full() and any(not self.bands[r].sheddable for r in self.waiting):
            raise GateFull("shed")
        if band.max_queued is not None and self._band_queued(band.rank) >= band.max_queued:
            raise GateFull("class_queue_full")
        if self.queued < self.max_waiting:
            return
        sheddable = [r for r in self.waiting if r > band.rank and self.bands[r].sheddable]
        if not sheddable:
            raise GateFull("queue_full")
        rank = max(sheddable)
        newest = max((q[-1] for q in self.waiting[rank].values()), key=lambda w: w.order)
        self._refuse(newest, "queue_full")

    def _shed_waiting(self) -> None:
        for rank in [r for r in self.waiting if self.bands[r].sheddable]:
            for waiter in [w for q in self.waiting[rank].values() for w in q]:
                self._refuse(waiter, "shed")

    def _refuse(self, waiter: _Waiter, reason: str) -> None:
        self._forget(waiter)
        waiter.ticket.set_exception(GateFull(reason))

    def _enqueue(self, waiter: _Waiter) -> None:
        rank = waiter.band.rank
        self.bands[rank] = waiter.band
        self.waiting.setdefault(rank, {}).setdefault(waiter.key, deque()).append(waiter)
        self.queued += 1
        self.observe(waiter.band, self._band_queued(rank))

    def _forget(self, waiter: _Waiter) -> None:
        rank = waiter.band.rank
        keys = self.waiting.get(rank, {})
        queue = keys.get(waiter.key)
        if queue is None or waiter not in queue:
            return
        queue.remove(waiter)
        self.queued -= 1
        if not queue:
            del keys[waiter.key]
            if not keys:
                del self.waiting[rank]
        self.observe(waiter.band, self._band_queued(rank))

    def release(self, band: Band = ONE_BAND) -> None:
        self.in_use -= 1
        self.band_in_use[band.rank] -= 1
        self.pump()

    def pump(self) -> None:
        """Hand free slots to the waiters of the most urgent band with room, in its keys' turns."""
        while self.waiting:
            rank = next((r for r in sorted(self.waiting) if self._room_for(self.bands[r])), None)
            if rank is None:
                return
            keys = self.waiting[rank]
            clock = self.clock.get(rank, 0.0)
            key = min(keys, key=lambda k: max(self.turn.get((rank, k), 0.0), clock))
            waiter = keys[key][0]
            self._forget(waiter)
            if waiter.ticket.done():  # gave up meanwhile
                continue
            self._admit(key, waiter.weight, waiter.band)
            waiter.ticket.set_result(None)
