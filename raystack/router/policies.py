"""Routing policies: which backend of a model, and which replica of that backend, takes a request.

Two levels, because every backend is its own Serve deployment, and each policy holds both:
  - `choose_backend`: the Router (forwarding.py) picks the backend from its own count of in-flight
    requests per backend and the replica counts its handles see;
  - `choose_replicas`: inside the backend, Serve's pluggable request router (replica_choice.py) asks the
    same policy to rank the replicas; Serve probes the first rank's queues and sends to the shortest.
A policy may compute a `route` from the request's prompt (prefix_affinity: its prefix blocks; kv_aware: its
blocks as the engines hash them); it travels with the request's call (replica/calls.Dispatch) to the request
router. What the two levels learn of the replicas is on the router process's RoutingBoard (routing_board.py).
A policy's settings are its model's `routing:` block (config.Routing), whose defaults are the only ones.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from raystack.config import Routing
from raystack.router.routing_board import RoutingBoard

logger = logging.getLogger("ray.serve")

# Prefixes are matched in blocks of this many characters (about 16 tokens): coarse enough to keep the
# table small, fine enough that a shared system prompt is a match.
PREFIX_BLOCK_CHARS = 64

Route = tuple[int, ...]


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


class Routed(Protocol):
    """What a policy may read of a request (router/exchange.Exchange)."""

    kind: str  # "chat" or "completion"
    body: dict[str, Any]
    adapter: str | None  # the LoRA adapter it is answered through, if any

    @property
    def prompt(self) -> str: ...  # protocol.prompt_text, made once, when asked


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

    def __init__(self, routing: Routing, board: RoutingBoard, rng: Any = random):
        self.routing = routing
        self.board = board
        self.rng = rng  # the random module, or a seeded random.Random in tests

    def route(self, request: Routed, deployments: Sequence[str]) -> Route:
        """What the replica choice needs to know of the request beyond the request itself; `deployments`:
        those of the model's backends."""
        return ()

    def candidates(self, backends: list[Any]) -> list[Any]:
        """Of a model's backends (config.Backend) that may take a request, those this policy weighs for it."""
        return backends

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

    def cached_tokens(self, deployment: str, replica: str, route: Route) -> int | None:
        """The prompt tokens of `route` that `replica`'s KV cache holds now, if the policy knows."""
        return None


class Weighted(LeastLoaded):
    """Backends by their `weight` (0: only when pinned with model@backend), replicas least loaded."""

    def candidates(self, backends: list[Any]) -> list[Any]:
        """Those with a weight, unless none has: a backend of weight 0 is not weighed per request."""
        return [b for b in backends if b.weight > 0] or backends

    def choose_backend(self, backends: Sequence[BackendLoad], route: Route = ()) -> str:
        weighted = [b for b in backends if b.weight > 0]
        if len(backends) > 1 and weighted:
            return self.rng.choices(weighted, weights=[b.weight for b in weighted])[0].name
        return super().choose_backend(backends, route)


class PrefixAffinity(LeastLoaded):
    """A prompt whose leading `prefix_chars` match what a replica served before goes to that replica (its
    prefix cache likely holds them) while it carries at most `affinity_slack` more requests than the
    least-loaded choice; otherwise least loaded."""

    def route(self, request: Routed, deployments: Sequence[str]) -> Route:
        return prefix_blocks(request.prompt, self.routing.prefix_chars)

    def choose_backend(self, backends: Sequence[BackendLoad], route: Route = ()) -> str:
        if len(backends) == 1:
            return backends[0].name
        least = self._least(backends)
        owner = self.board.prefixes.match(route) if route else None
        matched = owner and next((b for b in backends if b.deployment == owner[0]), None)
        if matched and matched.per_replica <= least.per_replica + self.routing.affinity_slack:
            return matched.name
        return least.name

    def choose_replicas(self, deployment: str, candidates: list[Any], route: Route,
                        in_flight: Callable[[Any], int]) -> list[list[Any]]:
        ranks = super().choose_replicas(deployment, candidates, route, in_flight)
        owner = self.board.prefixes.match(route, deployment) if route and len(candidates) > 1 else None
        preferred = owner and next((r for r in candidates if r.replica_id.unique_id == owner[1]), None)
        slack = self.routing.affinity_slack
        if preferred is not None and in_flight(preferred) <= min(map(in_flight, candidates)) + slack:
            ranks.insert(0, [preferred])
        return ranks

    def routed(self, deployment: str, replica: str, route: Route) -> None:
        if route:
            self.board.prefixes.record(route, deployment, replica)


class KvAware(LeastLoaded):
    """By what each replica's KV cache holds, as its engine's KV cache events tell (routing_board.KvCaches):
    the replica where the request would cost least, counting the prompt tokens it would have to prefill
    (those past the longest prefix of the request's blocks its cache holds) plus `kv_load_tokens` for each
    request already in flight there. Both are prefill work the request waits behind, so a replica holding
    the prefix wins while it carries fewer than (cached tokens / kv_load_tokens) requests more than the
    others, and an idle replica wins over a busy one that holds nothing; at equal cost, the replica whose cache
    holds fewest blocks (new prefixes spread evenly over the caches). A request whose blocks cannot be
    computed (a LoRA adapter's, a prompt under one block, before any replica published; or a model with one
    replica in all, where there is no choice to make) and replicas without events (MindIE's) are routed
    least_loaded.

    The router hashes a request as the engine does (prompt_blocks.py): the model's tokenizer and chat
    template, the engine's block size and hash. The tokenizer loads on a thread when the policy is made;
    until it has, requests are routed least_loaded."""

    def __init__(self, routing: Routing, board: RoutingBoard, rng: Any = random,
                 model_source: tuple[str | None, str | None] | None = None):
        super().__init__(routing, board, rng)
        self.tokenizer: Any = None
        if model_source is not None and model_source[0]:
            threading.Thread(target=self._load_tokenizer, args=model_source, daemon=True,
                             name="kv-aware-tokenizer").start()

    def _load_tokenizer(self, source: str, cache_dir: str | None) -> None:
        from raystack.models.sources import cache_root, tokenizer_dir
        from raystack.router.prompt_blocks import load_tokenizer

        try:
            where = tokenizer_dir(source, cache_root(cache_dir))
            if where is None:
                logger.warning("kv_aware: %s is not on the router's node, nor its tokenizer; routing by load only "
                               "(`raystack models prepare %s` there, or a shared cache_dir)", source, source)
                return
            self.tokenizer = load_tokenizer(where)
        except Exception as err:  # a checkpoint without a usable tokenizer: routed by load, and said so
            logger.warning("kv_aware: cannot load the tokenizer of %s (%s); routing by load only", source, err)

    def route(self, request: Routed, deployments: Sequence[str]) -> Route:
        from raystack.router.prompt_blocks import request_block_hashes

        hasher = self.board.kv.hasher(deployments) if self.tokenizer is not None else None
        if hasher is None or sum(self.board.running.get(d, 0) for d in deployments) < 2:
            return ()  # nothing to match against, or one replica in all: no choice to make, no tokenizing
        return tuple(request_block_hashes(hasher, self.tokenizer, request.kind, request.body,
                                          lora=bool(request.adapter)))

    def cost(self, replica: str, route: Route, block_size: int, in_flight: float) -> float:
        """Prompt tokens the request would wait to be prefilled behind on `replica`, its own uncached ones
        included (counted in whole blocks: only whole blocks are cached)."""
        uncached = (len(route) - self.board.kv.matched(replica, route)) * block_size
        return uncached + self.routing.kv_load_tokens * in_flight

    def choose_backend(self, backends: Sequence[BackendLoad], route: Route = ()) -> str:
        hasher = self.board.kv.hasher([b.deployment for b in backends]) if route else None
        if len(backends) == 1 or hasher is None:
            return super().choose_backend(backends, route)

        def backend_cost(backend: BackendLoad) -> float:
            replicas = self.board.kv.followed(backend.deployment) or {""}  # none followed: nothing cached
            return min(self.cost(r, route, hasher.block_size, backend.per_replica) for r in replicas)

        return min(backends, key=lambda b: (backend_cost(b), b.in_flight, self.rng.random())).name

    def choose_replicas(self, deployment: str, candidates: list[Any], route: Route,
                        in_flight: Callable[[Any], int]) -> list[list[Any]]:
        hasher = self.board.kv.hasher([deployment]) if route and len(candidates) > 1 else None
        if hasher is None:  # nothing to match, or a backend whose replicas publish no events
            return super().choose_replicas(deployment, candidates, route, in_flight)
        costs = {r.replica_id.unique_id: self.cost(r.replica_id.unique_id, route, hasher.block_size, in_flight(r))
                 for r in candidates}
        # At equal cost (a prefix no replica holds, on idle replicas), the one whose cache holds least: new
        # prefixes spread evenly over the caches, and none overflows while another has room.
        ranked = sorted(candidates, key=lambda r: (costs[r.replica_id.unique_id],
                                                   self.board.kv.index.blocks(r.replica_id.unique_id),
                                                   self.rng.random()))
        # The cheapest first; if Serve finds it full, the next cheapest, and so on.
        return [[replica] for replica in ranked]

    def cached_tokens(self, deployment: str, replica: str, route: Route) -> int | None:
        """What the engine should report as the request's usage.prompt_tokens_details.cached_tokens (the
        route stops short of the prompt's last token, which the engine always computes)."""
        hasher = self.board.kv.hasher([deployment]) if route else None
        return self.board.kv.matched(replica, route) * hasher.block_size if hasher is not None else None


# Each name config.Routing.policy accepts, and the policy it names.
POLICIES: dict[str, type[LeastLoaded]] = {
    "least_loaded": LeastLoaded, "prefix_affinity": PrefixAffinity, "weighted": Weighted, "kv_aware": KvAware}


def policy_for(routing: Routing, board: RoutingBoard, rng: Any = random,
               model_source: tuple[str | None, str | None] | None = None) -> LeastLoaded:
    """The policy a model's `routing:` settings name, keeping what it learns on `board`. `model_source`: the
    model's (source, cache_dir), for a policy that tokenizes prompts as the engine does (kv_aware, in the
    Router; Serve's request routers only rank replicas by the route the Router computed)."""
    if routing.policy == "kv_aware":
        return KvAware(routing, board, rng, model_source)
    return POLICIES[routing.policy](routing, board, rng)
