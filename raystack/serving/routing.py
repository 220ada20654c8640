"""Routing policy: which backend of a model, and which replica of that backend, takes a request.

Two levels, because every backend is its own Serve deployment:
  - the Router picks the backend (`choose_backend`) from its own count of in-flight requests per
    backend and the replica counts its handles see;
  - inside the backend, Serve's pluggable request router (`request_router.BackendRequestRouter`) picks
    the replica: two sampled at random, the one with fewer requests in flight wins.
For prefix_affinity both levels consult one PrefixTable per router process: the prompt's prefix blocks
map to the replica that last served them, whose KV cache most likely still holds them.
"""

from __future__ import annotations

import hashlib
import math
import random
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from raystack.serving.protocol import completion_prompts, message_text

# Prefixes are matched in blocks of this many characters (about 16 tokens): coarse enough to keep the
# table small, fine enough that a shared system prompt is a match.
PREFIX_BLOCK_CHARS = 64
PREFIX_TABLE_BLOCKS = 200_000  # ~30 MB at most; the least recently used blocks are forgotten first


def prompt_text(kind: str, body: dict[str, Any]) -> str:
    """The prompt as one string in message order, so a shared conversation start is a shared prefix."""
    if kind == "chat":
        return "".join(f"\x1e{m.get('role')}\x1f{message_text(m.get('content'))}" for m in body.get("messages") or [])
    prompt = completion_prompts(body.get("prompt", ""))[0]  # a batch: route by its first prompt
    if isinstance(prompt, list):
        return " ".join(map(str, prompt))
    return prompt


def prefix_blocks(text: str, max_chars: int) -> tuple[int, ...]:
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
    """prefix block -> (backend, replica) that served it last; bounded, least recently used out first.

    Shared by the Router's event loop and Serve's routing thread, hence the lock."""

    def __init__(self, capacity: int = PREFIX_TABLE_BLOCKS):
        self.capacity = capacity
        self._owners: OrderedDict[int, tuple[str, str]] = OrderedDict()
        self._lock = threading.Lock()

    def match(self, blocks: tuple[int, ...], backend: str | None = None) -> tuple[str, str] | None:
        """The owner of the longest matched prefix (on `backend` only, when given)."""
        with self._lock:
            for block in reversed(blocks):
                owner = self._owners.get(block)
                if owner is not None and (backend is None or owner[0] == backend):
                    return owner
        return None

    def record(self, blocks: tuple[int, ...], backend: str, replica: str) -> None:
        with self._lock:
            for block in blocks:
                self._owners[block] = (backend, replica)
                self._owners.move_to_end(block)
            while len(self._owners) > self.capacity:
                self._owners.popitem(last=False)

    def __len__(self) -> int:
        return len(self._owners)


PREFIXES = PrefixTable()

# deployment name -> running replicas, as this process's handles see them (BackendRequestRouter writes
# it when Serve tells the handle; absent until then).
RUNNING_REPLICAS: dict[str, int] = {}


@dataclass(frozen=True)
class BackendLoad:
    """One backend as the Router sees it when choosing."""

    name: str
    weight: float
    in_flight: int  # requests this router has sent it that have not finished
    replicas: int | None  # running replicas; None until the router's handle has heard

    @property
    def per_replica(self) -> float:
        replicas = 1 if self.replicas is None else self.replicas
        return self.in_flight / replicas if replicas else math.inf  # scaled to zero: last resort


def choose_backend(
    policy: str, backends: list[BackendLoad], affinity: str | None = None, slack: int = 0, rng: Any = random,
) -> str:
    """The backend for one request. `affinity`: the backend that served the prompt's prefix last;
    `rng`: the random module, or a seeded random.Random in tests."""
    if len(backends) == 1:
        return backends[0].name
    if policy == "weighted":
        weighted = [b for b in backends if b.weight > 0]
        if weighted:
            return rng.choices(weighted, weights=[b.weight for b in weighted])[0].name
    # Scaled-to-zero backends only when no backend has a replica; ties broken at random.
    least = min(backends, key=lambda b: (b.per_replica, b.in_flight, rng.random()))
    if policy == "prefix_affinity" and affinity is not None:
        matched = next((b for b in backends if b.name == affinity), None)
        if matched is not None and matched.per_replica <= least.per_replica + slack:
            return matched.name
    return least.name
