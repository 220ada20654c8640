"""The real vLLM CPU engine's KV events (tests/fixtures/kv_events, recorded by scripts/record_kv_events.py)
through kv_events, prompt_blocks and kv_index: the router computes the blocks the engine stores, and an
index fed the engine's events predicts the prefix cache hit the engine reported for each request."""

from __future__ import annotations

import json
import time

import msgspec
import pytest
import zmq

from raystack.models import sources
from raystack.router.kv_events import BlockRemoved, BlockStored, KvEventSubscriber, block_hash_int, decode_events
from raystack.router.kv_index import KvIndex
from raystack.router.prompt_blocks import (
    BlockHasher, chat_token_ids, completion_token_ids, engine_seed, load_tokenizer, request_block_hashes)
from tests import FIXTURES

RECORDING = FIXTURES / "kv_events"
META = json.loads((RECORDING / "meta.json").read_text())
MESSAGES = msgspec.msgpack.decode((RECORDING / "events.msgpack").read_bytes())
REQUESTS = json.loads((RECORDING / "requests.json").read_text())
BLOCK_SIZE = 128  # the CPU engine's


@pytest.fixture(scope="module")
def tokenizer():
    path = sources.locate(META["model"])
    if path is None:
        pytest.skip("the embedded model is not prepared (raystack models prepare)")
    return load_tokenizer(path)


def hasher() -> BlockHasher:
    seed = engine_seed({"PYTHONHASHSEED": META["PYTHONHASHSEED"]} if META["PYTHONHASHSEED"] else {})
    return BlockHasher(BLOCK_SIZE, META["prefix_caching_hash_algo"], seed)


def token_ids(tokenizer, record) -> list[int]:
    body = record["body"]
    return chat_token_ids(tokenizer, body) if record["kind"] == "chat" else completion_token_ids(tokenizer, body)


def stored_blocks() -> dict[int, list[int]]:
    """Every block the engine stored: its hash -> its token ids."""
    blocks = {}
    for _topic, _seq, payload in MESSAGES:
        for event in decode_events(payload):
            if isinstance(event, BlockStored):
                for i, block_hash in enumerate(event.block_hashes):
                    size = event.block_size
                    blocks[block_hash_int(block_hash)] = event.token_ids[i * size:(i + 1) * size]
    return blocks


def test_the_recording_is_whole_and_decodes():
    assert META["block_sizes"] == [BLOCK_SIZE]
    assert [int.from_bytes(seq, "big") for _topic, seq, _payload in MESSAGES] == list(range(len(MESSAGES)))
    assert {topic for topic, _seq, _payload in MESSAGES} == {META["topic"].encode()}
    events = [event for _topic, _seq, payload in MESSAGES for event in decode_events(payload)]
    assert any(isinstance(e, BlockStored) for e in events) and any(isinstance(e, BlockRemoved) for e in events)


def test_token_ids_are_the_engines(tokenizer):
    for record in REQUESTS:
        assert len(token_ids(tokenizer, record)) == record["usage"]["prompt_tokens"], record["body"]


def test_every_full_prompt_block_is_one_the_engine_stored_with_the_same_tokens(tokenizer):
    stored = stored_blocks()
    checked = 0
    for record in REQUESTS:
        ids = token_ids(tokenizer, record)
        hashes = hasher().hashes(ids)
        assert len(hashes) == len(ids) // BLOCK_SIZE
        for i, block_hash in enumerate(hashes):
            assert stored.get(block_hash) == ids[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE], (record["body"], i)
            checked += 1
    assert checked >= 2 * len(REQUESTS)


def test_an_index_of_the_events_so_far_predicts_each_requests_cache_hit(tokenizer):
    """Fed the batches that arrived before a request, the index's matched prefix is the engine's cache hit
    for it (usage.prompt_tokens_details.cached_tokens; the engine computes at least the prompt's last token,
    so a hit stops one token short of the prompt: vllm/v1/core/kv_cache_manager.py max_cache_hit_length)."""
    index, applied = KvIndex(), 0
    hits = []
    for record in REQUESTS:
        for _topic, _seq, payload in MESSAGES[applied:record["events_before"]]:
            index.apply("replica", decode_events(payload))
        applied = record["events_before"]
        hashes = request_block_hashes(hasher(), tokenizer, record["kind"], record["body"])
        prompt_tokens = record["usage"]["prompt_tokens"]
        predicted = min(index.matched("replica", hashes), (prompt_tokens - 1) // BLOCK_SIZE) * BLOCK_SIZE
        hits.append((predicted, record["usage"]["prompt_tokens_details"]["cached_tokens"]))
    assert [p for p, _ in hits] == [c for _, c in hits]
    assert sum(1 for p, _ in hits if p >= 2 * BLOCK_SIZE) >= 3  # shared prefixes of more than two blocks
    # The last request is the first again, after the filler prompts: the engine evicted its blocks, and the
    # index, told so by BlockRemoved events, expects no hit.
    assert REQUESTS[-1]["body"] == REQUESTS[0]["body"] and hits[-1] == (0, 0)


def test_the_recording_through_a_subscriber_builds_the_same_index(tmp_path):
    """The engine's messages as it sent them, on a PUB socket, through KvEventSubscriber into a KvIndex."""
    direct = KvIndex()
    for _topic, _seq, payload in MESSAGES:
        direct.apply("replica", decode_events(payload))
    followed = KvIndex()
    pub = zmq.Context.instance().socket(zmq.XPUB)  # XPUB: it hears the subscription
    pub.bind(f"ipc://{tmp_path}/pub")
    sub = KvEventSubscriber(f"ipc://{tmp_path}/pub", lambda events: followed.apply("replica", events),
                            lambda: followed.drop("replica"), topic=META["topic"])
    try:
        assert pub.poll(5000) and pub.recv() == b"\x01" + META["topic"].encode()
        for frames in MESSAGES:
            pub.send_multipart(frames)
        deadline = time.monotonic() + 10
        while sub.batches < len(MESSAGES) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        sub.close()
        pub.close(linger=0)
    assert sub.batches == len(MESSAGES) and sub.losses == 0
    assert followed.blocks("replica") == direct.blocks("replica") > 0
    assert followed.block_size("replica") == BLOCK_SIZE
