"""Routing policies: which backend of a model, and which replica of that backend, takes a request.

Two levels, because every backend is its own Serve deployment, and each policy holds both:
  - `choose_backend`: the Router (forwarding.py) picks the backend from its own count of in-flight
    requests per backend and the replica counts its handles see;
  - `choose_replicas`: inside the backend, Serve's pluggable request router (replica_choice.py) asks the
    same policy to rank the replicas; Serve probes the first rank's queues and sends to the shortest.
A policy may compute a `route` from the request (prefix_affinity: the prompt's prefix blocks); the
Router passes it to LLMServer.generate as the keyword `route`, where the request router reads it.

State shared by the two levels in one router process (the prefix table, the replica counts) lives in
this module and is always reached through it (`policies.PREFIXES`): Serve ships the request router's
class by value, and a module referenced by name is imported, not copied.
"""

from __future__ import annotations

import hashlib
import math
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

from raystack.protocol import completion_prompts, message_text

# Prefixes are matched in blocks of this many characters (about 16 tokens): coarse enough to keep the
# table small, fine enough that a shared system prompt is a match.
PREFIX_BLOCK_CHARS = 64
PREFIX_TABLE_BLOCKS = 200_000  # ~30 MB at most; the least recently used blocks are forgotten first

Route = tuple[int, ...]


def prompt_text(kind: str, body: dict[str, Any]) -> str:
    """The prompt as one string in message order, so a shared conversation start is a shared prefix."""
    if kind == "chat":
        return "".join(f"\x1e{m.get('role')}\x1f{message_text(m.get('content'))}" for m in body.get("messages") or [])
    prompt = completion_prompts(body.get("prompt", ""))[0]  # a batch: route by its first prompt
    if isinstance(prompt, list):
        return " ".join(map(str, prompt))
    return prompt


def prefix_blocks(text: str, max_chars: int) -> Route:
    """Chained hashes of the text's whole blocks: hash i covers text[:(i + 1) * PREFIX_BLOCK_CHARS], so two
    prompts share hash i exactly when they share that much prefix."""
    digest = hashlib.blake2b(digest_size=8)
    blocks = []
    end = min(len(text), max_chars) // PREFIX_BLOCK_CHARS * PREFIX_BLOCK_CHARS
    for start in range(0, end, PREFIX_BLOCK_CHARS):
        digest.update(text[start:start + PREFIX_BLOCK_CHARS].encode())
        blocks.append(int.from_bytes(digest.copy().digest(), "little"))
    return tuple(blocks)


class PrefixTable:
    """prefix block -> (deployment, replica) that served it last; bounded, least recently used out first.

    Shared by the Router's event loop and Serve's routing thread, hence the lock."""

    def __init__(self, capacity: int = PREFIX_TABLE_BLOCKS):
        self.capacity = capacity
        self._owners: OrderedDict[int, tuple[str, str]] = OrderedDict()
        self._lock = threading.Lock()

    def match(self, blocks: Route, deployment: str | None = None) -> tuple[str, str] | None:
        """The owner of the longest matched prefix (on `deployment` only, when given)."""
        with self._lock:
            for block in reversed(blocks):
                owner = self._owners.get(block)
                if owner is not None and (deployment is None or owner[0] == deployment):
                    return owner
        return None

    def record(self, blocks: Route, deployment: str, replica: str) -> None:
        with self._lock:
            for block in blocks:
                self._owners[block] = (deployment, replica)
                self._owners.move_to_end(block)
            while len(self._owners) > self.capacity:
                self._owners.popitem(last=False)

    def __len__(self) -> int:
        return len(self._owners)


PREFIXES = PrefixTable()

# deployment name -> running replicas, as this process's handles see them (the request router writes it
# when Serve tells the handle; absent until then).
RUNNING_REPLICAS: dict[str, int] = {}

# An attempt (Forwarder's token for one try of a request) -> the replica the request router sent it to,
# until the Forwarder has its opening.
ROUTED: dict[str, str] = {}


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


FAILING = FailingReplicas()


@dataclass(frozen=True)
class BackendLoad:
    """One backend as the Router sees it when choosing."""

    name: str
    deployment: str
    weight: float
    in_flight: int  # requests this router has sent it that have not finished
    replicas: int | None  # running replicas; None until the router's handle has heard

    @property
    def per_replica(self) -> float:
        replicas = 1 if self.replicas is None else self.replicas
        return self.in_flight / replicas if replicas else math.inf  # scaled to zero: last resort


class LeastLoaded:
    """The backend with the fewest requests in flight per replica (scaled-to-zero backends only when no
    backend has a replica; ties at random); inside it, two replicas sampled at random, the one with the
    shorter queue taking the request (power of two choices)."""

    name: ClassVar[str] = "least_loaded"

    def __init__(self, prefix_chars: int = 2048, affinity_slack: int = 4, rng: Any = random, **_: Any):
        self.prefix_chars = prefix_chars
        self.affinity_slack = affinity_slack
        self.rng = rng  # the random module, or a seeded random.Random in tests

    def route(self, kind: str, body: dict[str, Any]) -> Route:
        """What the replica choice needs to know of the request, beyond the request itself."""
        return ()

    def choose_backend(self, backends: Sequence[BackendLoad], route: Route = ()) -> str:
        if len(backends) == 1:
            return backends[0].name
        return self._least(backends).name

    def _least(self, backends: Sequence[BackendLoad]) -> BackendLoad:
        return min(backends, key=lambda b: (b.per_replica, b.in_flight, self.rng.random()))

    def choose_replicas(self, deployment: str, candidates: list[Any], route: Route,
                        in_flight: Callable[[Any], int]) -> list[list[Any]]:
        """Ranks of replicas to try, best first; Serve probes each rank's queues and takes the shortest."""
        return [self.rng.sample(candidates, min(2, len(candidates)))]

    def routed(self, deployment: str, replica: str, route: Route) -> None:
        """Serve sent a request with `route` to `replica` of `deployment`."""


class Weighted(LeastLoaded):
    """Backends by their `weight` (0: only when pinned with model@backend), replicas least loaded."""

    name: ClassVar[str] = "weighted"

    def choose_backend(self, backends: Sequence[BackendLoad], route: Route = ()) -> str:
        weighted = [b for b in backends if b.weight > 0]
        if len(backends) > 1 and weighted:
            return self.rng.choices(weighted, weights=[b.weight for b in weighted])[0].name
        return super().choose_backend(backends, route)


class PrefixAffinity(LeastLoaded):
    """A prompt whose leading `prefix_chars` match what a replica served before goes to that replica (its
    prefix cache likely holds them) while it carries at most `affinity_slack` more requests than the
    least-loaded choice; otherwise least loaded."""

    name: ClassVar[str] = "prefix_affinity"

    def route(self, kind: str, body: dict[str, Any]) -> Route:
        return prefix_blocks(prompt_text(kind, body), self.prefix_chars)

    def choose_backend(self, backends: Sequence[BackendLoad], route: Route = ()) -> str:
        if len(backends) == 1:
            return backends[0].name
        least = self._least(backends)
        owner = PREFIXES.match(route) if route else None
        matched = owner and next((b for b in backends if b.deployment == owner[0]), None)
        if matched and matched.per_replica <= least.per_replica + self.affinity_slack:
            return matched.name
        return least.name

    def choose_replicas(self, deployment: str, candidates: list[Any], route: Route,
                        in_flight: Callable[[Any], int]) -> list[list[Any]]:
        ranks = super().choose_replicas(deployment, candidates, route, in_flight)
        owner = PREFIXES.match(route, deployment) if route and len(candidates) > 1 else None
        preferred = owner and next((r for r in candidates if r.replica_id.unique_id == owner[1]), None)
        if preferred is not None and in_flight(preferred) <= min(map(in_flight, candidates)) + self.affinity_slack:
            ranks.insert(0, [preferred])
        return ranks

    def routed(self, deployment: str, replica: str, route: Route) -> None:
        if route:
            PREFIXES.record(route, deployment, replica)


POLICIES: dict[str, type[LeastLoaded]] = {p.name: p for p in (LeastLoaded, PrefixAffinity, Weighted)}


def policy_for(routing: dict[str, Any]) -> LeastLoaded:
    """The policy a model's `routing:` settings name (config.Routing, as a dict)."""
    return POLICIES[routing.get("policy", LeastLoaded.name)](**routing)
