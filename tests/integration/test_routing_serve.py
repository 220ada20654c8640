"""The router on a real local Ray cluster with synthetic backends: load spread, prefix affinity, a replica
killed under load, backpressure, timeouts, scale from zero, and autoscaling up and back down.

Each test deploys its own raystack service (run_stack on a config written here) under its own route prefix,
drives it with the openai client, and deletes it. Which replica answered comes from the router's
x-raystack-backend / x-raystack-replica headers.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from typing import Any, Callable

import httpx
import openai
import pytest
import ray
from ray import serve

from raystack.config import backend_app_name
from tests.integration.conftest import deployed, synthetic
from tests.serve_cluster import replica_actor, replica_ids


class Outcome:
    """One streamed request as the client saw it."""

    def __init__(self, headers: httpx.Headers | None = None):
        self.served_by = (headers["x-raystack-backend"], headers["x-raystack-replica"]) if headers else None
        self.text = ""
        self.finish_reason: str | None = None
        self.error: Exception | None = None


async def asked(client: openai.AsyncOpenAI, model: str, messages: list[dict], on_open: Callable[[Outcome], None],
                **kwargs: Any) -> tuple[Outcome, Any]:
    """A chat request's Outcome so far and its raw response, None if it was refused (the Outcome's error)."""
    try:
        raw = await client.chat.completions.with_raw_response.create(model=model, messages=messages, **kwargs)
    except openai.APIStatusError as err:
        outcome = Outcome()
        outcome.error = err
        return outcome, None
    outcome = Outcome(raw.headers)
    on_open(outcome)
    return outcome, raw


async def stream_chat(client: openai.AsyncOpenAI, model: str, messages: list[dict],
                      on_open: Callable[[Outcome], None] = lambda _: None, **kwargs: Any) -> Outcome:
    """`on_open`: called once the answer opens (the router answers with the first chunk)."""
    outcome, raw = await asked(client, model, messages, on_open, stream=True, **kwargs)
    if raw is None:
        return outcome
    try:
        async for chunk in raw.parse():
            if chunk.choices:
                outcome.text += chunk.choices[0].delta.content or ""
                outcome.finish_reason = chunk.choices[0].finish_reason or outcome.finish_reason
    except openai.APIError as err:  # an error event in the stream
        outcome.error = err
    return outcome


async def whole_chat(client: openai.AsyncOpenAI, model: str, messages: list[dict],
                     on_open: Callable[[Outcome], None] = lambda _: None, **kwargs: Any) -> Outcome:
    """A whole (non-streamed) answer, as stream_chat's Outcome."""
    outcome, raw = await asked(client, model, messages, on_open, **kwargs)
    if raw is not None:
        choice = raw.parse().choices[0]
        outcome.text, outcome.finish_reason = choice.message.content or "", choice.finish_reason
    return outcome


def client_of(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)


async def stream_chats(url: str, requests: list[tuple[str, list[dict]]], concurrency: int,
                       on_open: Callable[[Outcome], None] = lambda _: None, chat=stream_chat) -> list[Outcome]:
    """Streams (model, messages) requests (or asks them whole: `chat` whole_chat), at most `concurrency` at
    once; outcomes in request order."""
    gate = asyncio.Semaphore(concurrency)
    async with client_of(url) as client:
        async def one(model: str, messages: list[dict]) -> Outcome:
            async with gate:
                return await chat(client, model, messages, on_open)

        return await asyncio.gather(*(one(model, messages) for model, messages in requests))


def ask(question: str, system: str = "Answer briefly.") -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


FAST = {"ttft_ms": 20, "tokens_per_s": 100, "output_tokens": 12}  # ~0.13 s per answer


def router_sees(url: str, model: str, replicas: dict[str, int], timeout_s: float = 30) -> None:
    """Wait until the router at `url` (its /v1) routes `model` over every backend of `replicas` (backend ->
    running replicas): it finds a model's further backends at its next look at Serve's state (every 5 s),
    and a workload sent before would meet only the first."""
    health = url.removesuffix("/v1") + "/health/models"
    deadline = time.monotonic() + timeout_s
    while True:
        seen = {b["name"]: b["replicas"] for m in httpx.get(health).json()["data"] if m["id"] == model
                for b in m["backends"]}
        if seen == replicas or time.monotonic() > deadline:
            assert seen == replicas, f"the router sees {seen} of {model}'s replicas, not {replicas}"
            return
        time.sleep(0.5)


def test_least_loaded_spreads_evenly_over_every_replica_of_every_backend(server):
    models = [{"name": "m", "backends": [synthetic("a", 2, **FAST), synthetic("b", 2, **FAST)]}]
    with deployed(server, "spread", models) as url:
        router_sees(url, "m", {"a": 2, "b": 2})
        outcomes = asyncio.run(stream_chats(url, [("m", ask(f"question {i}")) for i in range(240)], concurrency=16))
    assert all(o.error is None and o.finish_reason == "stop" for o in outcomes)
    shares = Counter(o.served_by for o in outcomes)
    assert len(shares) == 4 and {backend for backend, _ in shares} == {"a", "b"}
    even = len(outcomes) / 4
    assert all(abs(n - even) <= 0.2 * even for n in shares.values()), shares


def prefix_workload(prefixes: int = 8, per_prefix: int = 12) -> list[tuple[int, list[dict]]]:
    """Requests sharing one of a few long system prompts, as a chat product's users do; interleaved."""
    systems = [f"You are assistant number {p}. " + "Follow the operator's policy carefully. " * 8
               for p in range(prefixes)]
    return [(p, ask(f"user {i} asks question {i * 7 + p}", systems[p]))
            for i in range(per_prefix) for p in range(prefixes)]


def affinity_hit_rate(outcomes: list[Outcome], workload: list[tuple[int, list[dict]]]) -> float:
    """Share of requests served by the replica that served most of their prefix's requests."""
    by_prefix: dict[int, Counter] = defaultdict(Counter)
    for (prefix, _), outcome in zip(workload, outcomes):
        by_prefix[prefix][outcome.served_by] += 1
    return sum(c.most_common(1)[0][1] for c in by_prefix.values()) / len(outcomes)


@pytest.mark.parametrize("policy, expect_high", [("prefix_affinity", True), ("least_loaded", False)])
def test_prefix_affinity_sends_a_shared_prefix_to_the_same_replica(server, policy, expect_high):
    models = [{"name": "m", "routing": {"policy": policy},
               "backends": [synthetic("a", 2, **FAST), synthetic("b", 2, **FAST)]}]
    workload = prefix_workload()
    with deployed(server, f"affinity-{policy.replace('_', '-')}", models) as url:
        router_sees(url, "m", {"a": 2, "b": 2})  # the contrast means 4 replicas for least_loaded to scatter over
        outcomes = asyncio.run(stream_chats(url, [("m", messages) for _, messages in workload], concurrency=8))
    assert all(o.error is None for o in outcomes)
    rate = affinity_hit_rate(outcomes, workload)
    if expect_high:
        assert rate >= 0.9, rate
        # The first 8 requests, one per prefix, arrive at once: each is counted on its replica when the router
        # picks it, before Serve counts it, so the burst does not pile on the first replica used, where
        # affinity would then keep its prefixes.
        first_burst = Counter(o.served_by for o in outcomes[:8])
        assert sorted(first_burst.values()) == [2, 2, 2, 2], first_burst
    else:  # the contrast: without affinity the same workload scatters (an even spread over 4 replicas gives
        # ~0.45; a busy machine skews least_loaded's queues, and CI saw 0.60 and 0.75: still below affinity's 0.9)
        assert rate < 0.85, rate


async def kill_a_replica_during(url: str, app: str, kill_after_s: float | None) -> tuple[list[Outcome], str]:
    """32 concurrent streams; one replica is killed kill_after_s after they start, or (None) the one serving
    the most streams once all have opened (a replica that got its streams late, such as the successor of
    one killed before, may not have opened them by any fixed time). Returns its id."""
    opened: Counter = Counter()
    all_open = asyncio.Event()

    def count(outcome: Outcome) -> None:
        opened[outcome.served_by[1]] += 1
        if opened.total() == 32:
            all_open.set()

    async def assassin() -> str:
        if kill_after_s is None:
            await all_open.wait()
            victim = opened.most_common(1)[0][0]
        else:
            await asyncio.sleep(kill_after_s)
            victim = sorted(replica_ids(app))[0]
        ray.kill(replica_actor(app, victim), no_restart=True)
        return victim

    streams = stream_chats(url, [("m", ask(f"stream {i}")) for i in range(32)], concurrency=32, on_open=count)
    outcomes, victim = await asyncio.wait_for(asyncio.gather(streams, assassin()), timeout=60)
    return outcomes, victim


def test_a_replica_killed_under_32_streams_loses_no_request(server):
    # First token at 0.8 s, then 25 tokens at 20/s: a stream lasts about 2 s.
    slow = {"ttft_ms": 800, "tokens_per_s": 20, "output_tokens": 25}
    models = [{"name": "m", "backends": [synthetic("s", 3, **slow)]}]
    with deployed(server, "kill", models) as url:
        # Killed before any first token: the router resends those requests, all complete.
        outcomes, victim = asyncio.run(kill_a_replica_during(url, "kill", kill_after_s=0.3))
        assert [o.error for o in outcomes if o.error] == []
        assert all(o.finish_reason == "stop" and len(o.text.split()) == 25 for o in outcomes)
        assert all(o.served_by[1] != victim for o in outcomes)

        # Killed mid-stream (each stream lasts 1.25 s after it opens): its streams end with a clear error
        # event, every other completes.
        outcomes, victim = asyncio.run(kill_a_replica_during(url, "kill", kill_after_s=None))
    broken = [o for o in outcomes if o.error]
    assert broken and len(broken) < len(outcomes), (victim, [(o.served_by, o.error) for o in outcomes])
    assert all(o.served_by[1] == victim and "failed mid-stream" in str(o.error) for o in broken)
    assert all(o.finish_reason == "stop" for o in outcomes if not o.error)


def burst(url: str, requests: int = 12) -> list[httpx.Response]:
    """`requests` chats to model `m` at once, non-streamed."""
    async def send_all():
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            return await asyncio.gather(*(http.post("/chat/completions", json={"model": "m", "messages": ask(f"q{i}")})
                                          for i in range(requests)))

    return asyncio.run(send_all())


def test_full_replicas_and_queue_answer_429_with_retry_after(server):
    models = [{"name": "m", "backends": [synthetic(
        "s", 1, ttft_ms=1000, tokens_per_s=0, output_tokens=4, max_ongoing_requests=2, max_queued_requests=2)]}]
    with deployed(server, "busy", models) as url:
        responses = burst(url)
    statuses = Counter(r.status_code for r in responses)
    assert statuses[200] >= 4 and statuses[429] >= 4 and set(statuses) == {200, 429}, statuses
    rejected = next(r for r in responses if r.status_code == 429)
    assert int(rejected.headers["retry-after"]) >= 1
    error = rejected.json()["error"]
    assert error["type"] == "rate_limit_error" and "queue is full" in error["message"]


def test_a_full_router_answers_429_with_retry_after_instead_of_queueing_without_end(server):
    # The router itself: 2 at a time, 2 more waiting in the proxy; the backend has room for all.
    models = [{"name": "m", "backends": [synthetic("s", 1, ttft_ms=1000, tokens_per_s=0, output_tokens=4)]}]
    with deployed(server, "router-full", models, router={"max_ongoing_requests": 2, "max_queued_requests": 2}) as url:
        responses = burst(url)
    statuses = Counter(r.status_code for r in responses)
    assert statuses[200] >= 2 and statuses[429] >= 4 and set(statuses) == {200, 429}, statuses
    assert all(int(r.headers["retry-after"]) >= 1 for r in responses if r.status_code == 429)


def test_timeouts_bound_every_wait(server):
    models = [
        {"name": "slow", "backends": [synthetic("s", 1, ttft_ms=5000)]},
        {"name": "long", "backends": [synthetic("s", 1, ttft_ms=10, tokens_per_s=5, output_tokens=50)]},
        {"name": "cold", "backends": [synthetic("s", startup_s=60, autoscaling={"min_replicas": 0, "max_replicas": 1})]},
    ]
    with deployed(server, "tight", models, router={"first_token_timeout_s": 1.5, "request_timeout_s": 2.5}) as url:
        started = time.monotonic()
        slow, long, cold = asyncio.run(stream_chats(url, [(m, ask("hi")) for m in ("slow", "long", "cold")], 3))
        assert time.monotonic() - started < 10
    assert slow.error.status_code == 504 and "first_token_timeout_s" in str(slow.error)
    assert "request_timeout_s" in str(long.error) and 0 < len(long.text.split()) < 50
    assert cold.error.status_code == 503 and "came up" in str(cold.error)


def test_scale_from_zero_serves_the_first_request_and_health_is_ok_at_zero(server):
    models = [{"name": "m", "backends": [synthetic(
        "s", startup_s=2, autoscaling={"min_replicas": 0, "max_replicas": 1, "metrics_interval_s": 0.5,
                                       "downscale_delay_s": 5})]}]
    with deployed(server, "zero", models) as url:
        assert httpx.get(f"{server}/zero/health").status_code == 200  # zero replicas is its resting state
        started = time.monotonic()
        [outcome] = asyncio.run(stream_chats(url, [("m", ask("wake up"))], 1))
        assert outcome.error is None and outcome.finish_reason == "stop"
        assert time.monotonic() - started >= 2  # it waited for a replica to start


def running_replicas(app: str, deployment: str) -> int:
    status = serve.status().applications[app].deployments[deployment]  # app: the backend's application
    return status.replica_states.get("RUNNING", 0)


# Streams are Serve calls; whole answers come over the chunk channel with no Serve call (replica/direct_answers.py),
# which raystack's autoscaling policy counts from what the replicas report.
@pytest.mark.parametrize("chat", [stream_chat, whole_chat], ids=["streams", "whole answers"])
def test_a_backend_scales_up_under_load_and_back_down_after(server, chat):
    autoscaling = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2, "upscale_delay_s": 0.5,
                   "downscale_delay_s": 2, "metrics_interval_s": 0.5, "look_back_period_s": 2}
    models = [{"name": "m", "backends": [synthetic(
        "s", ttft_ms=100, tokens_per_s=10, output_tokens=20, autoscaling=autoscaling)]}]
    deployment = "LLMServer-m-s"
    with deployed(server, "scale", models) as url:
        assert running_replicas(backend_app_name("scale", "m", "s"), deployment) == 1
        # One answer first, through Serve: the replica then connects to the router, and the whole answers of the
        # load below go over that connection, which Serve does not count.
        assert asyncio.run(stream_chats(url, [("m", ask("warm up"))], 1, chat=chat))[0].error is None
        peak = 0

        async def load_and_watch() -> list[Outcome]:
            # Waves of 12 streams until a new replica has served some: a loaded CI machine may take
            # 10 s or more to start one, so a fixed-size load could end before it is up.
            nonlocal peak
            outcomes: list[Outcome] = []
            deadline = time.monotonic() + 90
            while len({o.served_by for o in outcomes}) < 2 and time.monotonic() < deadline:
                wave = asyncio.ensure_future(stream_chats(url, [("m", ask(f"q{i}")) for i in range(12)], 12,
                                                          chat=chat))
                while not wave.done():
                    peak = max(peak, running_replicas(backend_app_name("scale", "m", "s"), deployment))
                    await asyncio.sleep(0.5)
                outcomes += await wave
            return outcomes

        outcomes = asyncio.run(load_and_watch())
        assert all(o.error is None for o in outcomes)
        assert peak >= 2, "12 requests at once against a target of 2 per replica must add replicas"
        assert len({o.served_by for o in outcomes}) >= 2, "the new replicas took requests"
        deadline = time.monotonic() + 60
        while running_replicas(backend_app_name("scale", "m", "s"), deployment) > 1 and time.monotonic() < deadline:
            time.sleep(1)
        assert running_replicas(backend_app_name("scale", "m", "s"), deployment) == 1
