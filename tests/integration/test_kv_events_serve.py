"""A real vLLM CPU replica that publishes its KV cache events (a model under routing: kv_aware): it says where
through Serve's replica metadata, and a plain ZeroMQ subscriber there sees the blocks of a prompt stored, hashed
as a router can hash them from what the replica reported (vLLM's own hash functions, the reported seed).

The replica is deployed as build_backend deploys it for a kv_aware model (LLMServer with kv_events), under the
default routing policy: the kv_aware policy itself is the router's, tested with it. One engine, started once,
on a Ray node of 2 CPUs (the replica holds 1)."""

from __future__ import annotations

import time

import pytest
import ray
from ray import serve

from raystack.app import deployment_options
from raystack.config import Backend, deployment_name
from raystack.engines.vllm.kv_events import HASH_SEED
from raystack.models import sources
from raystack.replica.calls import Dispatch
from raystack.replica.server import LLMServer
from tests.serve_cluster import serve_cluster

pytestmark = pytest.mark.e2e

MODEL, SOURCE, APP = "smollm2", "smollm2-135m-instruct", "kv-events"
# About 500 tokens: three whole blocks of 128 (the CPU engine's block size) and then some.
PROMPT = "The quick brown fox jumps over the lazy dog, and then it runs into the forest. " * 30
END_SEQ = (-1).to_bytes(8, "big", signed=True)  # ZmqEventPublisher.END_SEQ: the end of a replay


@pytest.fixture(scope="module")
def replica():
    """The deployment's name, once its one replica (and engine) runs."""
    with serve_cluster():
        cache_dir = sources.cache_root(None)
        sources.resolve(SOURCE, cache_dir)  # as build_backend does for an embedded model
        backend = Backend(name="vllm", device="cpu", max_model_len=2048, engine_args={"dtype": "float32"},
                          resources={"cpus": 1}, autoscaling={"min_replicas": 1, "max_replicas": 1})
        name = deployment_name(MODEL, backend.name)
        app = LLMServer.options(name=name, **deployment_options(backend)).bind(
            MODEL, SOURCE, backend.model_dump(), str(cache_dir), kv_events=True)
        serve.run(app, name=APP, route_prefix=None)
        yield name


@ray.remote(num_cpus=0)
def follow_the_kv_cache(deployment: str, prompt: str, timeout_s: float = 120) -> dict:
    """In the cluster, as a router would: the replica's metadata, a SUB socket on its endpoint, the same chat
    twice through the deployment's handle, then the batches published (live, and replayed from the start)."""
    import msgspec
    import zmq
    from vllm.distributed.kv_events import BlockStored, KVEventBatch

    handle = serve.get_deployment_handle(deployment, app_name=APP)
    kv = handle.record_replica_metadata.remote().result(timeout_s=60)["kv_events"]
    context = zmq.Context()
    live = context.socket(zmq.SUB)
    live.connect(kv["endpoint"])
    live.setsockopt_string(zmq.SUBSCRIBE, kv["topic"])
    time.sleep(1)  # a SUB socket gets only what is published once it has joined

    chat = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1, "temperature": 0}
    openings = [next(iter(handle.options(stream=True).generate.remote(Dispatch("chat", chat)))) for _ in range(2)]

    decode = msgspec.msgpack.Decoder(KVEventBatch).decode

    def stored(payload: bytes) -> list[dict]:
        return [msgspec.structs.asdict(e) for e in decode(payload).events if isinstance(e, BlockStored)]

    published = []
    deadline = time.monotonic() + timeout_s
    while not published and time.monotonic() < deadline:
        if live.poll(1000):
            topic, _seq, payload = live.recv_multipart()
            assert topic == kv["topic"].encode()
            published += stored(payload)

    replay = context.socket(zmq.DEALER)
    replay.connect(kv["replay"])
    replay.send_multipart([b"", (0).to_bytes(8, "big")])  # every batch since sequence number 0
    replayed = []
    while replay.poll(timeout_s * 1000):
        _, topic, seq, payload = replay.recv_multipart()
        if seq == END_SEQ:
            break
        replayed += stored(payload)
    context.destroy(linger=0)
    return {"kv": kv, "node_ip": ray.util.get_node_ip_address(), "published": published, "replayed": replayed,
            "replicas": [o.replica for o in openings], "usages": [o.body["usage"] for o in openings]}


def test_a_replica_publishes_its_kv_cache_events_where_it_tells_the_routers(replica, monkeypatch):
    seen = ray.get(follow_the_kv_cache.remote(replica, PROMPT), timeout=300)
    kv = seen["kv"]
    assert kv["endpoint"].startswith(f"tcp://{seen['node_ip']}:") and kv["replay"].startswith(f"tcp://{seen['node_ip']}:")
    assert kv["topic"] == seen["replicas"][0]  # the replica's id
    assert (kv["block_size"], kv["hash_algo"], kv["hash_seed"], kv["vllm"]) == (128, "sha256", HASH_SEED, "0.32")

    # The prompt's whole blocks, stored by the first request: its first block has no parent.
    [first] = [event for event in seen["published"] if event["parent_block_hash"] is None]
    assert len(first["block_hashes"]) >= 3 and first["block_size"] == kv["block_size"]
    assert len(first["token_ids"]) == kv["block_size"] * len(first["block_hashes"])
    assert first in seen["replayed"]  # the replay endpoint hands back what a late subscriber missed

    # Hashed as a router can: vLLM's hash function, the parent of a first block derived from the reported seed.
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils

    hash_fn = get_hash_fn_by_name(kv["hash_algo"])
    monkeypatch.setenv("PYTHONHASHSEED", kv["hash_seed"])  # init_none_hash reads it, as the replica's EngineCore did
    kv_cache_utils.init_none_hash(hash_fn)
    block = kv_cache_utils.hash_block_tokens(hash_fn, None, first["token_ids"][:kv["block_size"]])
    assert kv_cache_utils.maybe_convert_block_hash(block) == first["block_hashes"][0]

    # The second, identical request found the prompt's blocks cached, and the answer says how many tokens.
    assert not (seen["usages"][0]["prompt_tokens_details"] or {}).get("cached_tokens")
    assert seen["usages"][1]["prompt_tokens_details"]["cached_tokens"] >= 3 * kv["block_size"]
