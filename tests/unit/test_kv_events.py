"""kv_events.py: both vLLM wire forms decode, and the subscriber follows vLLM's own publisher through a
late start, a lost batch (replayed, or the index dropped) and a restart."""

from __future__ import annotations

import threading
import time

import msgspec
import pytest
import zmq

from raystack.router.kv_events import (
    AllBlocksCleared, BlockRemoved, BlockStored, KvEventSubscriber, block_hash_int, decode_events)


def test_vllm_032_batches_decode_map_events_with_fields_added_since():
    kv_events = pytest.importorskip("vllm.distributed.kv_events")
    digest = bytes(range(32))
    batch = kv_events.KVEventBatch(ts=1.5, events=[
        kv_events.BlockStored(block_hashes=[7, digest], parent_block_hash=None, token_ids=list(range(256)),
                              block_size=128, lora_id=None, medium="GPU", lora_name=None,
                              extra_keys=[None, None], group_idx=0, session_id="s1", locality="LOCAL"),
        kv_events.BlockRemoved(block_hashes=[7], medium="GPU", group_idx=0),
        kv_events.AllBlocksCleared(),
    ], data_parallel_rank=0)
    stored, removed, cleared = decode_events(msgspec.msgpack.encode(batch))
    assert isinstance(stored, BlockStored) and stored.block_hashes == [7, digest]
    assert (stored.token_ids, stored.block_size, stored.medium, stored.group_idx) == (list(range(256)), 128, "GPU", 0)
    assert isinstance(removed, BlockRemoved) and removed.block_hashes == [7]
    assert isinstance(cleared, AllBlocksCleared)


def test_vllm_023_batches_decode_array_events_short_or_long():
    """vLLM 0.23's KVCacheEvent is array_like (vllm/distributed/kv_events.py at v0.23.0): each event is
    [tag, fields in declaration order...], trailing defaults left out."""
    events = [
        ["BlockStored", [1, 2], None, [5] * 32, 16, None, "GPU", None],  # up to lora_name, as 0.10-0.22
        ["BlockStored", [3], 2, [6] * 16, 16, 4, "GPU", "sql", [["sql"]], 0],  # extra_keys, group_idx
        ["BlockRemoved", [1], "GPU"],
        ["BlockRemoved", [2], "GPU", 0],
        ["AllBlocksCleared"],
    ]
    decoded = decode_events(msgspec.msgpack.encode([2.0, events, 0]))
    assert [type(e).__name__ for e in decoded] == [
        "_BlockStoredArray", "_BlockStoredArray", "_BlockRemovedArray", "_BlockRemovedArray",
        "_AllBlocksClearedArray"]
    first, second, removed, _, cleared = decoded
    assert isinstance(first, BlockStored) and isinstance(removed, BlockRemoved)
    assert isinstance(cleared, AllBlocksCleared)
    assert (first.block_hashes, first.parent_block_hash, first.block_size, first.extra_keys) == ([1, 2], None, 16, None)
    assert (second.lora_name, second.lora_id, second.extra_keys, second.group_idx) == ("sql", 4, [["sql"]], 0)


def test_a_block_hash_in_either_form_becomes_the_int_vllm_sends_by_default():
    kv_cache_utils = pytest.importorskip("vllm.v1.core.kv_cache_utils")
    digest = bytes(range(100, 132))
    as_int = kv_cache_utils.maybe_convert_block_hash(digest)  # VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1
    assert block_hash_int(digest) == as_int == block_hash_int(as_int)


def test_garbage_is_a_decode_error():
    with pytest.raises(msgspec.DecodeError):
        decode_events(b"\x01\x02")


# --- the subscriber against vLLM's ZmqEventPublisher ------------------------------------------------------

class Recorder:
    """What a subscriber hands on: the first block hash of each batch (the tests number batches by it)."""

    def __init__(self):
        self.seen: list[int] = []
        self.lost = 0
        self.lock = threading.Lock()

    def on_events(self, events):
        with self.lock:
            self.seen.extend(e.block_hashes[0] for e in events if isinstance(e, BlockStored))

    def on_lost(self):
        with self.lock:
            self.lost += 1
            self.seen.append(-1)  # where the loss fell among the batches


def batch(n: int):
    from vllm.distributed.kv_events import BlockStored as VllmBlockStored, KVEventBatch

    return KVEventBatch(ts=time.time(), events=[VllmBlockStored(
        block_hashes=[n], parent_block_hash=None, token_ids=[n] * 4, block_size=4, lora_id=None,
        medium="GPU", lora_name=None)])


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def publisher(tmp_path):
    kv_events = pytest.importorskip("vllm.distributed.kv_events")
    pub = kv_events.ZmqEventPublisher(data_parallel_rank=0, endpoint=f"ipc://{tmp_path}/pub",
                                      replay_endpoint=f"ipc://{tmp_path}/replay", topic="replica-a")
    yield pub
    pub.shutdown()


def publish_until_heard(pub, recorder, first: int) -> int:
    """Publishes batches numbered from `first` until the subscriber has heard one of them (a SUB socket
    hears nothing sent before it joined); returns the next number."""
    n = first
    while not any(seen >= first for seen in recorder.seen):
        pub.publish(batch(n))
        n += 1
        time.sleep(0.05)
    return n


def test_a_late_subscriber_replays_what_it_missed_from_the_start(publisher, tmp_path):
    publisher.publish(batch(0))
    time.sleep(0.3)  # batch 0 is gone by the time anyone subscribes
    recorder = Recorder()
    sub = KvEventSubscriber(f"ipc://{tmp_path}/pub", recorder.on_events, recorder.on_lost, topic="replica-a",
                            replay_endpoint=f"ipc://{tmp_path}/replay")
    try:
        n = publish_until_heard(publisher, recorder, 1)
        for i in range(n, n + 5):
            publisher.publish(batch(i))
        wait_for(lambda: len(recorder.seen) == n + 5)
        assert recorder.seen == list(range(n + 5)) and recorder.lost == 0
        assert sub.last_seq == n + 4
    finally:
        sub.close()
    assert not sub.alive


class DroppingRelay:
    """Passes vLLM's batches on from its PUB socket to another, except the ones numbered in `drop`: a
    network that loses messages, in front of the real publisher."""

    def __init__(self, source: str, target: str, drop: set[int]):
        self.source, self.target, self.drop = source, target, drop
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        self.ready.wait(5)

    def run(self):
        ctx = zmq.Context.instance()
        sub, pub = ctx.socket(zmq.SUB), ctx.socket(zmq.PUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(self.source)
        pub.bind(self.target)
        self.ready.set()
        while not self.stop.is_set():
            if sub.poll(50):
                frames = sub.recv_multipart()
                if int.from_bytes(frames[1], "big") not in self.drop:
                    pub.send_multipart(frames)
        sub.close(linger=0)
        pub.close(linger=0)

    def close(self):
        self.stop.set()
        self.thread.join(5)


@pytest.mark.parametrize("replay", [True, False])
def test_a_lost_batch_is_replayed_or_the_index_dropped(publisher, tmp_path, replay):
    recorder = Recorder()
    relay = DroppingRelay(f"ipc://{tmp_path}/pub", f"ipc://{tmp_path}/relay", drop=set())
    sub = KvEventSubscriber(f"ipc://{tmp_path}/relay", recorder.on_events, recorder.on_lost, topic="replica-a",
                            replay_endpoint=f"ipc://{tmp_path}/replay" if replay else None)
    try:
        n = publish_until_heard(publisher, recorder, 0)  # both hops joined
        wait_for(lambda: recorder.seen and recorder.seen[-1] == n - 1)
        relay.drop.update({n + 1, n + 2})
        for i in range(n, n + 5):
            publisher.publish(batch(i))
        wait_for(lambda: recorder.seen and recorder.seen[-1] == n + 4)
        after = recorder.seen[recorder.seen.index(n - 1) + 1:]
        if replay:
            assert after == [n, n + 1, n + 2, n + 3, n + 4] and recorder.lost == 0
        else:
            assert after == [n, -1, n + 3, n + 4] and recorder.lost == 1
    finally:
        sub.close()
        relay.close()
    assert not sub.alive


def test_a_restarted_publisher_drops_the_index_and_is_followed_from_its_first_batch(tmp_path):
    kv_events = pytest.importorskip("vllm.distributed.kv_events")
    recorder = Recorder()
    endpoint = f"ipc://{tmp_path}/pub"
    sub = KvEventSubscriber(endpoint, recorder.on_events, recorder.on_lost, topic="t")
    first_round_last = None
    try:
        for restart in range(2):
            pub = kv_events.ZmqEventPublisher(data_parallel_rank=0, endpoint=endpoint, topic="t")
            n = publish_until_heard(pub, recorder, 100 * (restart + 1))
            wait_for(lambda: recorder.seen[-1] == n - 1)
            # Each publisher counts from 0, and its batches here from 100 or 200: seq = number - first.
            assert sub.last_seq == n - 1 - 100 * (restart + 1)
            if restart:
                # The second publisher's count went back to 0: on its disconnection or its first batch, the
                # subscriber dropped the index, then followed the new one.
                assert recorder.lost >= 1 and -1 in recorder.seen[recorder.seen.index(first_round_last):]
            first_round_last = n - 1
            pub.shutdown()
            time.sleep(0.2)
    finally:
        sub.close()


def test_close_is_prompt_with_no_publisher_at_all(tmp_path):
    recorder = Recorder()
    threads = threading.active_count()
    sub = KvEventSubscriber(f"ipc://{tmp_path}/nobody", recorder.on_events, recorder.on_lost)
    started = time.monotonic()
    sub.close()
    assert time.monotonic() - started < 1.0
    assert not sub.alive and threading.active_count() == threads


def test_a_vllm_023_publishers_replay_answers_without_the_topic(tmp_path):
    """vLLM 0.23's _service_replay answers [b"", seq, payload] and ends with [b"", -1, b""] (no topic frame,
    vllm/distributed/kv_events.py at v0.23.0); its batches' events are arrays. A stand-in publisher here
    speaks that form: it skips batch 1 on the live socket, and the subscriber replays it."""
    ctx = zmq.Context.instance()
    pub, router = ctx.socket(zmq.XPUB), ctx.socket(zmq.ROUTER)  # XPUB: it hears the subscription
    pub.bind(f"ipc://{tmp_path}/pub")
    router.bind(f"ipc://{tmp_path}/replay")

    def payload(n):
        return msgspec.msgpack.encode([1.0, [["BlockStored", [n], None, [n] * 4, 4, None, "GPU", None]], 0])

    recorder = Recorder()
    sub = KvEventSubscriber(f"ipc://{tmp_path}/pub", recorder.on_events, recorder.on_lost, topic="t",
                            replay_endpoint=f"ipc://{tmp_path}/replay")
    try:
        assert pub.poll(5000) and pub.recv() == b"\x01t"  # the subscriber has joined
        pub.send_multipart([b"t", (0).to_bytes(8, "big"), payload(0)])
        pub.send_multipart([b"t", (2).to_bytes(8, "big"), payload(2)])  # batch 1 lost on the way
        assert router.poll(5000)
        client, empty, start = router.recv_multipart()
        assert (empty, int.from_bytes(start, "big")) == (b"", 1)
        for n in (1, 2):
            router.send_multipart([client, b"", n.to_bytes(8, "big"), payload(n)])
        router.send_multipart([client, b"", (-1).to_bytes(8, "big", signed=True), b""])
        wait_for(lambda: recorder.seen[-1] == 2)
        assert recorder.seen == [0, 1, 2]
        assert recorder.lost == 0 and sub.last_seq == 2
    finally:
        sub.close()
        pub.close(linger=0)
        router.close(linger=0)


def test_when_the_buffer_has_moved_on_its_last_batches_rebuild_the_index(tmp_path):
    """A publisher keeping 3 batches: a late subscriber applies the last ones it holds (true as far as they
    go, on an empty index); a gap wider than the buffer drops the index, then rebuilds it the same way."""
    kv_events = pytest.importorskip("vllm.distributed.kv_events")
    pub = kv_events.ZmqEventPublisher(data_parallel_rank=0, endpoint=f"ipc://{tmp_path}/pub", buffer_steps=3,
                                      replay_endpoint=f"ipc://{tmp_path}/replay", topic="t")
    for n in range(6):
        pub.publish(batch(n))
    time.sleep(0.3)
    recorder = Recorder()
    relay = DroppingRelay(f"ipc://{tmp_path}/pub", f"ipc://{tmp_path}/relay", drop=set())
    sub = KvEventSubscriber(f"ipc://{tmp_path}/relay", recorder.on_events, recorder.on_lost, topic="t",
                            replay_endpoint=f"ipc://{tmp_path}/replay")
    try:
        n = publish_until_heard(pub, recorder, 6)
        wait_for(lambda: recorder.seen[-1] == n - 1)
        seen = recorder.seen
        assert seen == list(range(seen[0], n)) and 0 < seen[0] and recorder.lost == 0  # what the buffer held
        relay.drop.update(range(n + 1, n + 5))
        for i in range(n, n + 7):
            pub.publish(batch(i))
        wait_for(lambda: recorder.seen[-1] == n + 6)
        after = recorder.seen[recorder.seen.index(n):]
        rebuilt = after[2:]
        assert after[:2] == [n, -1] and recorder.lost == 1
        assert rebuilt == list(range(rebuilt[0], n + 7)) and rebuilt[0] >= n + 2
    finally:
        sub.close()
        relay.close()
        pub.shutdown()
