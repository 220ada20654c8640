"""The routing policies' pure parts: prefix blocks, the prefix table, the choice of backend, the calls counted
ahead of Serve."""

from __future__ import annotations

import random
from collections import Counter

from raystack.config import Routing
from raystack.protocol import prompt_text
from raystack.replica.calls import Dispatch
from raystack.router.policies import POLICIES, PREFIX_BLOCK_CHARS, BackendLoad, policy_for, prefix_blocks
from raystack.router.routing_board import PrefixTable, RoutingBoard

SYSTEM = "You are a careful assistant who answers questions about the Ascend NPU cluster. " * 3


def chat(system: str, *turns: str) -> dict:
    """A conversation: the system prompt, then user and assistant turns in alternation."""
    roles = ["user", "assistant"]
    return {"messages": [{"role": "system", "content": system}]
            + [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]}


def test_prompts_sharing_a_system_prompt_share_its_blocks_and_no_more():
    a = prefix_blocks(prompt_text("chat", chat(SYSTEM, "How many cards?")), 4096)
    b = prefix_blocks(prompt_text("chat", chat(SYSTEM, "Which driver version?")), 4096)
    shared = len(SYSTEM) // PREFIX_BLOCK_CHARS
    assert a[:shared] == b[:shared]
    assert a[-1] != b[-1]
    assert prefix_blocks("short prompt", 4096) == ()  # under one block: nothing worth matching


def test_blocks_stop_at_prefix_chars_and_a_conversation_extends_its_own_prefix():
    first = prompt_text("chat", chat(SYSTEM, "Tell me about HCCL."))
    follow_up = prompt_text("chat", chat(SYSTEM, "Tell me about HCCL.", "HCCL is Huawei's...", "And HCCS?"))
    assert follow_up.startswith(first)
    assert len(prefix_blocks(first * 10, 256)) == 256 // PREFIX_BLOCK_CHARS
    assert prefix_blocks(follow_up, 4096)[: len(prefix_blocks(first, 4096))] == prefix_blocks(first, 4096)


def test_completion_prompts_route_by_text_or_token_ids():
    assert prompt_text("completion", {"prompt": "abc"}) == "abc"
    assert prompt_text("completion", {"prompt": [1, 2, 3]}) == "1 2 3"
    assert prompt_text("completion", {"prompt": [[4, 5], [6]]}).startswith("4 5")  # a batch: its first prompt first


def test_prefix_table_returns_the_longest_match_and_forgets_the_oldest():
    table = PrefixTable(capacity=4)
    table.record((1, 2, 3), "vllm", "r1")
    table.record((1, 2, 9), "mindie", "r2")
    assert table.match((1, 2, 3)) == ("vllm", "r1")  # block 3 is only r1's
    assert table.match((1, 2, 7)) == ("mindie", "r2")  # blocks 1, 2 were last served by r2
    assert table.match((1, 2, 7), deployment="vllm") is None
    assert table.match((1, 2, 3), deployment="vllm") == ("vllm", "r1")
    table.record((5,), "vllm", "r3")
    assert len(table) == 4 and table.match((3,)) is None  # block 3 was the least recently used


def loads(*specs: tuple[str, int, int | None]) -> list[BackendLoad]:
    return [BackendLoad(name, f"LLMServer-m-{name}", 1, in_flight, replicas) for name, in_flight, replicas in specs]


def choose(policy: str, backends: list[BackendLoad], route=(), rng=random, board=None, **routing) -> str:
    settings = Routing(policy=policy, **routing)
    return policy_for(settings, board or RoutingBoard(), rng).choose_backend(backends, route)


def test_every_policy_the_config_accepts_is_registered():
    assert set(Routing.model_fields["policy"].annotation.__args__) == set(POLICIES)


def test_least_loaded_compares_requests_per_replica():
    assert choose("least_loaded", loads(("a", 6, 3), ("b", 3, 1))) == "a"  # 2 per replica vs 3
    assert choose("least_loaded", loads(("a", 0, 0), ("b", 50, 2))) == "b"  # a is scaled to zero
    assert choose("least_loaded", loads(("a", 0, 0), ("b", 1, 0))) == "a"  # all cold: fewest waiting
    rng = random.Random(0)
    ties = Counter(choose("least_loaded", loads(("a", 2, 1), ("b", 2, 1)), rng=rng) for _ in range(400))
    assert 150 < ties["a"] < 250  # equal load: either, at random


def test_prefix_affinity_keeps_the_matched_backend_within_the_slack():
    board = RoutingBoard()
    board.prefixes.record((7, 8), "LLMServer-m-a", "r1")
    two = loads(("a", 5, 1), ("b", 2, 1))
    assert choose("prefix_affinity", two, route=(7, 8), affinity_slack=3, board=board) == "a"
    assert choose("prefix_affinity", two, route=(7, 8), affinity_slack=2, board=board) == "b"
    assert choose("prefix_affinity", two, route=(9,), affinity_slack=9, board=board) == "b"  # no match: least loaded


def test_weighted_splits_by_weight_and_skips_weightless_backends():
    rng = random.Random(1)
    backends = [BackendLoad(n, n, w, 0, 1) for n, w in (("a", 3), ("b", 1), ("c", 0))]
    shares = Counter(choose("weighted", backends, rng=rng) for _ in range(4000))
    assert shares["c"] == 0
    assert 0.72 < shares["a"] / 4000 < 0.78


def test_weighted_weighs_only_backends_with_a_weight_unless_none_has_one():
    # The Forwarder weighs each request's candidates: a model's weight-0 backends (pinned-only) cost nothing.
    policy = policy_for(Routing(policy="weighted"), RoutingBoard())
    backends = [BackendLoad(n, n, w, 0, 1) for n, w in (("a", 3), ("b", 0), ("c", 1))]
    assert [b.name for b in policy.candidates(backends)] == ["a", "c"]
    assert policy.candidates(backends[1:2]) == backends[1:2]  # only weightless: still one to choose
    assert policy_for(Routing(policy="least_loaded"), RoutingBoard()).candidates(backends) == backends


def test_a_pinned_call_counts_on_its_replica_until_settled_once():
    # Serve's request router settles a call when it routes it, the Forwarder when the request ends: both may.
    board = RoutingBoard()
    first, second = Dispatch("chat", {}), Dispatch("chat", {})
    board.ahead.pin(first, "r1")
    board.ahead.pin(second, "r1")
    board.ahead.add("r2")  # a direct answer
    assert (board.ahead.get("r1"), board.ahead.get("r2"), first.pinned) == (2, 1, "r1")
    board.ahead.settle(first)
    board.ahead.settle(first)
    assert board.ahead.get("r1") == 1
    board.ahead.settle(second)
    board.ahead.remove("r2")
    board.ahead.settle(Dispatch("chat", {}))  # never pinned: nothing to settle
    assert board.ahead.counts == {}
