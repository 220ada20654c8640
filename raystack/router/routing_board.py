"""The RoutingBoard: what one router process knows of its backends' replicas, written and read by both levels
of the replica choice there.

Two parties choose for each request in a router process: the Forwarder (forwarding.py, on the Router's event
loop) picks the backend, and Serve's request router of that backend's handle (replica_choice.py, on Serve's
routing thread) picks the replica. They share this board, and nothing else: Serve builds the request
routers itself, so the board is reached through this module (`routing_board.BOARD`), never copied into
another module's globals (Serve ships a request router's class to each handle's process, with the globals
it names).

Nothing per request is on the board: a request's own needs travel with its call (replica/calls.Dispatch).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

from raystack.router.kv_caches import KvCaches

PREFIX_TABLE_BLOCKS = 200_000  # ~30 MB at most; the least recently used blocks are forgotten first


class PrefixTable:
    """prefix block -> (deployment, replica) that served it last; bounded, least recently used out first.

    Written on Serve's routing thread, read on the Router's event loop too: hence the lock."""

    def __init__(self, capacity: int = PREFIX_TABLE_BLOCKS):
        self.capacity = capacity
        self._owners: OrderedDict[int, tuple[str, str]] = OrderedDict()
        self._lock = threading.Lock()

    def match(self, blocks: Sequence[int], deployment: str | None = None) -> tuple[str, str] | None:
        """The owner of the longest matched prefix (on `deployment` only, when given)."""
        with self._lock:
            for block in reversed(blocks):
                owner = self._owners.get(block)
                if owner is not None and (deployment is None or owner[0] == deployment):
                    return owner
        return None

    def record(self, blocks: Sequence[int], deployment: str, replica: str) -> None:
        with self._lock:
            for block in blocks:
                self._owners[block] = (deployment, replica)
                self._owners.move_to_end(block)
            while len(self._owners) > self.capacity:
                self._owners.popitem(last=False)

    def __len__(self) -> int:
        return len(self._owners)


class FailingReplicas:
    """Replicas whose engine just failed a request on its side, kept from new requests for `hold_s` (or
    until Serve replaces them): power-of-two choices would otherwise favour them, as failing fast keeps
    their queue short. If every replica is failing, all stay candidates."""

    def __init__(self, hold_s: float = 30.0):
        self.hold_s = hold_s
        self.until: dict[str, float] = {}  # replica id -> monotonic time its hold ends

    def add(self, replica: str) -> None:
        self.until[replica] = time.monotonic() + self.hold_s

    def keep_only(self, replicas: set[str]) -> None:
        """Forget replicas Serve no longer runs."""
        self.until = {r: t for r, t in self.until.items() if r in replicas}

    def usable(self, candidates: list[Any], avoid: Sequence[str] = ()) -> list[Any]:
        now = time.monotonic()
        held = {r for r, t in self.until.items() if t > now} | set(avoid)
        fine = [c for c in candidates if c.replica_id.unique_id not in held]
        return fine or candidates


class Ahead:
    """replica id -> the requests this process sent it that Serve's queue-length cache does not count: direct
    answers until they end (Serve never sees them), and calls pinned to it until Serve routes them. Serve counts
    a call in its replica's queue once it sends it (request_router.py, on_send_request): the calls of a burst,
    all pinned before then, would otherwise all see the same queues and pile on one replica.

    Counted on the Router's event loop, settled on Serve's routing loop too (the same one under Serve's
    throughput preset, process.py; a thread of its own without it): hence the lock."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, replica: str) -> None:
        with self._lock:
            self.counts[replica] += 1

    def remove(self, replica: str) -> None:
        with self._lock:
            self._less(replica)

    def pin(self, call: Any, replica: str) -> None:
        """`call` (a replica/calls.Dispatch) is to go to `replica`: counted there until settled."""
        call.pinned = replica
        with self._lock:
            call.counted_ahead = True
            self.counts[replica] += 1

    def settle(self, call: Any) -> None:
        """Serve routed `call` (and counts it now), or never will: no longer counted here. Once only."""
        with self._lock:
            if call.counted_ahead:
                call.counted_ahead = False
                self._less(call.pinned)

    def _less(self, replica: str) -> None:
        self.counts[replica] -= 1
        if self.counts[replica] <= 0:
            del self.counts[replica]

    def get(self, replica: str) -> int:
        return self.counts.get(replica, 0)


@dataclass
class RoutingBoard:
    """`prefixes`: which replica served which prompt prefix last (prefix_affinity); `kv`: which blocks each
    publishing replica's KV cache holds, from its events (kv_aware); `running`: each backend deployment's
    running replicas, as the handles last heard from Serve (absent until then); `failing`: replicas kept from
    new requests for a while; `routers`: each backend deployment's request router in this process, which the
    Forwarder asks where a request would go before it sends it; `ahead`: each replica's requests from this
    process that Serve's queue-length cache does not count (yet)."""

    prefixes: PrefixTable = field(default_factory=PrefixTable)
    kv: KvCaches = field(default_factory=KvCaches)
    running: dict[str, int] = field(default_factory=dict)
    failing: FailingReplicas = field(default_factory=FailingReplicas)
    routers: dict[str, Any] = field(default_factory=dict)  # deployment -> its request router (replica_choice.py)
    ahead: Ahead = field(default_factory=Ahead)


BOARD = RoutingBoard()
