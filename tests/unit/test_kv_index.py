"""kv_index.py: what each replica holds, from its events; the longest held prefix; the bound on memory."""

from __future__ import annotations

import random
import threading
import tracemalloc

from raystack.router.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from raystack.router.kv_index import BYTES_PER_BLOCK, KvIndex


def stored(*hashes, medium="GPU", block_size=4, parent=None):
    return BlockStored(block_hashes=list(hashes), parent_block_hash=parent,
                       token_ids=[0] * block_size * len(hashes), block_size=block_size, medium=medium)


def test_matched_counts_the_leading_blocks_a_replica_holds():
    index = KvIndex()
    index.apply("a", [stored(1, 2, 3)])
    index.apply("b", [stored(1)])
    assert index.matched("a", [1, 2, 3, 4]) == 3
    assert index.matched("a", [1, 9, 3]) == 1  # a prefix: block 3 after a miss does not count
    assert index.matched("b", [1, 2, 3]) == 1
    assert index.matched("c", [1, 2, 3]) == 0  # no events from it yet
    assert index.matched("a", []) == 0


def test_removed_and_cleared_blocks_are_forgotten_and_a_lost_replica_dropped():
    index = KvIndex()
    index.apply("a", [stored(1, 2, 3), BlockRemoved(block_hashes=[2], medium="GPU")])
    assert index.matched("a", [1, 2, 3]) == 1
    index.apply("a", [BlockRemoved(block_hashes=[77], medium="GPU")])  # never heard of: nothing to do
    index.apply("a", [AllBlocksCleared(), stored(5)])  # in order: cleared, then 5 stored
    assert index.matched("a", [1]) == 0 and index.matched("a", [5]) == 1
    index.drop("a")
    assert index.matched("a", [5]) == 0 and index.replicas() == []


def test_bytes_and_int_hashes_are_one_block():
    index = KvIndex()
    digest = bytes(24) + (1234).to_bytes(8, "big")  # its low 64 bits are 1234
    index.apply("a", [stored(digest)])
    assert index.matched("a", [1234]) == 1
    index.apply("a", [BlockRemoved(block_hashes=[1234], medium="GPU")])
    assert index.blocks("a") == 0


def test_offload_tiers_are_not_the_engines_pool():
    index = KvIndex()
    index.apply("a", [stored(1, 2), stored(1, 2, medium="CPU"), BlockRemoved(block_hashes=[1], medium="CPU")])
    assert index.matched("a", [1, 2]) == 2
    index.apply("a", [stored(3, medium=None)])  # an engine that names no medium: its own pool
    assert index.blocks("a") == 3


def test_block_size_is_learned_from_full_blocks():
    index = KvIndex()
    assert index.block_size("a") is None
    index.apply("a", [BlockStored(block_hashes=[1], token_ids=[0] * 5, block_size=16, medium="GPU")])
    assert index.block_size("a") is None  # a partial block's event
    index.apply("a", [stored(2, 3, block_size=128)])
    assert index.block_size("a") == 128


def test_the_bound_evicts_the_oldest_stored_first():
    index = KvIndex(max_blocks=3)
    index.apply("a", [stored(1, 2, 3)])
    index.apply("a", [stored(1)])  # stored again: youngest now
    index.apply("a", [stored(4)])
    assert index.blocks("a") == 3
    assert index.matched("a", [1]) == 1 and index.matched("a", [2]) == 0


def test_memory_per_block_is_what_the_bound_assumes():
    """The documented cost of an entry (a random 64-bit hash, as the engine sends them) holds within 10%."""
    index = KvIndex(max_blocks=50_000)
    rng = random.Random(0)
    hashes = [rng.getrandbits(64) for _ in range(50_000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for start in range(0, len(hashes), 100):
            index.apply("a", [stored(*hashes[start:start + 100])])
        per_block = (tracemalloc.get_traced_memory()[0] - before) / len(hashes)
    finally:
        tracemalloc.stop()
    assert abs(per_block - BYTES_PER_BLOCK) < 0.1 * BYTES_PER_BLOCK, per_block
    assert index.approx_bytes() == BYTES_PER_BLOCK * 50_000


def test_readers_on_other_threads_see_whole_batches():
    """A batch stores blocks 0..99 of a chain and the next removes them all: a reader never sees a partial
    prefix of the chain."""
    index = KvIndex()
    chain = list(range(100))
    stop = threading.Event()
    seen = set()

    def write():
        while not stop.is_set():
            index.apply("a", [stored(*chain)])
            index.apply("a", [BlockRemoved(block_hashes=chain, medium="GPU")])

    writer = threading.Thread(target=write)
    writer.start()
    try:
        for _ in range(2000):
            seen.add(index.matched("a", chain))
    finally:
        stop.set()
        writer.join()
    assert seen <= {0, 100}
