"""KvIndex: which prompt blocks each replica's KV cache holds, as its KV events (kv_events.py) tell.

A block is known by its hash in one form (kv_events.block_hash_int: the digest's low 64 bits), the form
prompt_blocks.py computes for a request, so `matched` says how many of a request's leading blocks a replica
could serve from its prefix cache.

Only the engine's own block pool counts (medium "GPU", or none given by older engines: vLLM names its
device pool so on every platform, the CPU engine's too); blocks an offloading connector reports in "CPU" or
"STORAGE" tiers are left out, as a removal from one tier would otherwise remove the other's. KV cache groups
are not told apart: exact for models with one group (every model whose blocks prompt_blocks.py can hash).
The engine may hold one hash in two blocks for a while (vllm/v1/core/block_pool.py does not deduplicate);
the first removal forgets it here: a missed hit, never a false one.

Bounded: at most `max_blocks` per replica, the oldest stored first out. The engine's own pool is smaller
than the default bound for every model raystack serves, so the bound only acts when removals were lost; an
entry costs ~141 bytes (a 64-bit int in an OrderedDict, measured by tests/unit/test_kv_index.py), so the
default bound is ~15 MB a replica.

Written by each replica's subscriber thread, read by the router's threads: one lock.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Iterable, Sequence

from raystack.router.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent, block_hash_int

MAX_BLOCKS_PER_REPLICA = 100_000
BYTES_PER_BLOCK = 141  # measured; see the module's docstring
INDEXED_MEDIA = (None, "GPU")  # vllm/distributed/kv_events.py MEDIUM_GPU: the engine's own block pool


class KvIndex:
    def __init__(self, max_blocks: int = MAX_BLOCKS_PER_REPLICA):
        self.max_blocks = max_blocks
        self._blocks: dict[str, OrderedDict[int, None]] = {}  # replica -> hashes, oldest stored first
        self._block_size: dict[str, int] = {}  # replica -> tokens per block, from its full BlockStored events
        self._lock = threading.Lock()

    def apply(self, replica: str, events: Iterable[KvEvent]) -> None:
        """One batch of the replica's events, in the engine's order."""
        with self._lock:
            blocks = self._blocks.setdefault(replica, OrderedDict())
            for event in events:
                if isinstance(event, BlockStored):
                    if event.medium not in INDEXED_MEDIA:
                        continue
                    for block_hash in event.block_hashes:
                        key = block_hash_int(block_hash)
                        blocks[key] = None
                        blocks.move_to_end(key)  # stored again (a reuse report): youngest now
                    if event.block_size and len(event.token_ids) == event.block_size * len(event.block_hashes):
                        self._block_size[replica] = event.block_size
                elif isinstance(event, BlockRemoved):
                    if event.medium not in INDEXED_MEDIA:
                        continue
                    for block_hash in event.block_hashes:
                        blocks.pop(block_hash_int(block_hash), None)
                elif isinstance(event, AllBlocksCleared):
                    blocks.clear()
            while len(blocks) > self.max_blocks:
                blocks.popitem(last=False)

    def drop(self, replica: str) -> None:
        """Forget what the replica holds: its events were lost, or it is gone."""
        with self._lock:
            self._blocks.pop(replica, None)
            self._block_size.pop(replica, None)

    def matched(self, replica: str, hashes: Sequence[int]) -> int:
        """How many of the request's leading block hashes the replica holds (its longest cached prefix)."""
        with self._lock:
            blocks = self._blocks.get(replica)
            if not blocks:
                return 0
            count = 0
            for block_hash in hashes:
                if block_hash not in blocks:
                    break
                count += 1
            return count

    def block_size(self, replica: str) -> int | None:
        """Tokens per block as the replica's events say; None before its first full block."""
        with self._lock:
            return self._block_size.get(replica)

    def blocks(self, replica: str) -> int:
        with self._lock:
            return len(self._blocks.get(replica, ()))

    def replicas(self) -> list[str]:
        with self._lock:
            return list(self._blocks)

    def approx_bytes(self) -> int:
        """Memory the index's entries take, from the measured cost of one."""
        with self._lock:
            return BYTES_PER_BLOCK * sum(map(len, self._blocks.values()))
