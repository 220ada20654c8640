"""kv_aware: the router follows each replica's KV cache events (published by vLLM's own ZmqEventPublisher) and
sends a request where its prompt's blocks are cached, unless that replica's load outweighs them."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import pytest

from raystack.config import Routing
from raystack.router.policies import BackendLoad, KvAware, policy_for
from raystack.router.prompt_blocks import BlockHasher
from raystack.router.routing_board import RoutingBoard

kv_events = pytest.importorskip("vllm.distributed.kv_events")

DEPLOYMENT = "LLMServer-m-vllm"
BLOCK = 4
HASHER = BlockHasher(BLOCK, "sha256", "raystack-test")
TENANT_A = list(range(100, 132))  # 8 blocks of a "system prompt"
TENANT_B = list(range(500, 532))


@dataclass(frozen=True)
class ReplicaId:
    unique_id: str


@dataclass(frozen=True)
class Candidate:
    """What Serve's request router hands a policy: a running replica, known by its id."""

    replica_id: ReplicaId


def candidate(name: str) -> Candidate:
    return Candidate(ReplicaId(name))


class Engines:
    """One vLLM event publisher per replica, as vLLM's engine runs it, and the metadata its replica reports."""

    def __init__(self, tmp_path, names):
        self.publishers = {name: kv_events.ZmqEventPublisher(
            data_parallel_rank=0, endpoint=f"ipc://{tmp_path}/{name}", replay_endpoint=f"ipc://{tmp_path}/{name}-replay",
            topic=name) for name in names}
        self.addresses = {name: {"endpoint": f"ipc://{tmp_path}/{name}", "replay": f"ipc://{tmp_path}/{name}-replay",
                                 "topic": name, "block_size": BLOCK, "hash_algo": "sha256",
                                 "hash_seed": "raystack-test"} for name in names}

    def store(self, name: str, tokens: list[int]) -> None:
        hashes = HASHER.hashes(tokens)
        self.publishers[name].publish(kv_events.KVEventBatch(ts=time.time(), events=[kv_events.BlockStored(
            block_hashes=hashes, parent_block_hash=None, token_ids=tokens[:len(hashes) * BLOCK], block_size=BLOCK,
            lora_id=None, medium="GPU", lora_name=None)]))

    def clear(self, name: str) -> None:
        self.publishers[name].publish(kv_events.KVEventBatch(ts=time.time(), events=[kv_events.AllBlocksCleared()]))

    def close(self) -> None:
        for publisher in self.publishers.values():
            publisher.shutdown()


@pytest.fixture
def engines(tmp_path):
    running = Engines(tmp_path, ["r1", "r2"])
    yield running
    running.close()


@pytest.fixture
def board():
    board = RoutingBoard()
    yield board
    board.kv.close()


def wait_until(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def stored(engines: Engines, board: RoutingBoard, name: str, tokens: list[int]) -> None:
    """Publishes until the board has heard it (a subscriber hears nothing sent before it joined, and
    replays from the publisher's buffer what it missed once it has)."""
    route = HASHER.hashes(tokens)
    while board.kv.matched(name, route) < len(route):
        engines.store(name, tokens)
        time.sleep(0.05)


def policy(board: RoutingBoard, **routing) -> KvAware:
    return policy_for(Routing(policy="kv_aware", **routing), board, random.Random(0))


def test_the_replica_holding_the_prefix_wins_until_its_load_outweighs_it(engines, board):
    board.kv.follow(DEPLOYMENT, [(name, address) for name, address in engines.addresses.items()])
    wait_until(lambda: board.kv.followed(DEPLOYMENT) == {"r1", "r2"}, "both replicas followed")
    stored(engines, board, "r2", TENANT_A)
    stored(engines, board, "r1", TENANT_B)
    kv = policy(board, kv_load_tokens=8)  # a request in flight weighs 2 blocks: r2's 8 blocks beat 3 more
    route = tuple(HASHER.hashes(TENANT_A + [7, 7, 7, 7, 7]))  # tenant A's prompt and a question
    replicas = [candidate("r1"), candidate("r2")]

    def first(loads: dict[str, int]) -> str:
        return kv.choose_replicas(DEPLOYMENT, replicas, route, lambda r: loads[r.replica_id.unique_id])[0][0] \
            .replica_id.unique_id

    assert first({"r1": 0, "r2": 0}) == "r2"
    assert first({"r1": 0, "r2": 3}) == "r2"  # 3 x 8 tokens of load < 32 cached tokens
    assert first({"r1": 0, "r2": 5}) == "r1"  # 40 > 32: the idle replica, though it must prefill
    assert first({"r1": 4, "r2": 5}) == "r2"
    ranks = kv.choose_replicas(DEPLOYMENT, replicas, route, lambda r: 0)
    assert [rank[0].replica_id.unique_id for rank in ranks] == ["r2", "r1"]  # Serve tries r1 if r2 is full


def test_a_replica_that_cleared_its_cache_or_left_is_credited_with_nothing(engines, board):
    board.kv.follow(DEPLOYMENT, list(engines.addresses.items()))
    stored(engines, board, "r1", TENANT_A)
    route = HASHER.hashes(TENANT_A)
    engines.clear("r1")  # vLLM's reset_prefix_cache (and a restarted engine's first words)
    wait_until(lambda: board.kv.matched("r1", route) == 0, "the clear applied")

    stored(engines, board, "r1", TENANT_A)
    board.kv.follow(DEPLOYMENT, [("r2", engines.addresses["r2"])])  # Serve replaced r1
    assert board.kv.followed(DEPLOYMENT) == {"r2"}
    assert board.kv.matched("r1", route) == 0 and "r1" not in board.kv.index.replicas()


def test_backends_without_events_are_chosen_by_load_against_the_cached_prefix(engines, board):
    board.kv.follow(DEPLOYMENT, [("r1", engines.addresses["r1"])])
    stored(engines, board, "r1", TENANT_A)
    kv = policy(board, kv_load_tokens=8)
    route = tuple(HASHER.hashes(TENANT_A))

    def backends(vllm_in_flight: int) -> list[BackendLoad]:  # MindIE publishes nothing: no replica followed
        return [BackendLoad("vllm", DEPLOYMENT, 1, vllm_in_flight, 1), BackendLoad("mindie", "LLMServer-m-mindie", 1, 0, 1)]

    assert kv.choose_backend(backends(2), route) == "vllm"  # 16 tokens of load against 32 to prefill on mindie
    assert kv.choose_backend(backends(5), route) == "mindie"
    assert kv.choose_backend(backends(0), ()) in {"vllm", "mindie"}  # no blocks: least loaded


def test_a_route_is_the_engines_block_hashes_once_a_replica_says_how_it_hashes(engines, board):
    from raystack.models.sources import locate
    from raystack.router.prompt_blocks import load_tokenizer, request_block_hashes

    model_dir = locate("smollm2-135m-instruct")
    if model_dir is None:
        pytest.skip("the embedded model is not prepared here")
    kv = policy(board)
    kv.tokenizer = load_tokenizer(model_dir)  # as the policy's loader thread does

    @dataclass
    class Request:
        kind: str
        body: dict
        adapter: str | None = None
        prompt: str = ""

    body = {"messages": [{"role": "system", "content": "You answer questions about Ascend NPUs. " * 20},
                         {"role": "user", "content": "How many cards per node?"}]}
    assert kv.route(Request("chat", body), [DEPLOYMENT]) == ()  # no replica has said how its engine hashes
    board.kv.follow(DEPLOYMENT, [("r1", engines.addresses["r1"])])
    board.running[DEPLOYMENT] = 1
    assert kv.route(Request("chat", body), [DEPLOYMENT]) == ()  # one replica in all: nothing to choose
    board.running[DEPLOYMENT] = 2
    route = kv.route(Request("chat", body), [DEPLOYMENT])
    assert len(route) > 10 and route == tuple(request_block_hashes(HASHER, kv.tokenizer, "chat", body))
    assert kv.route(Request("chat", body, adapter="sql-lora"), [DEPLOYMENT]) == ()  # an adapter keys its blocks
