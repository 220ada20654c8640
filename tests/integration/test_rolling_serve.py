"""Updates and router failures under long streams, on synthetic backends: a redeploy (which replaces the
router and the backend's replicas) finishes every stream it found, and a router replica killed under
load cuts only the streams it was relaying.

The streams last longer than Serve's default drain (20 s) and the one raystack used to set (30 s)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import ray
from ray import serve

from raystack.app import build_app
from tests.integration.conftest import synthetic
from tests.serve_cluster import replica_actors

STREAMS = 16
TOKENS = 70  # at 2 tokens/s: 35 s a stream


class Ending:
    def __init__(self) -> None:
        self.router: str | None = None
        self.words = 0
        self.done = False
        self.error: str | None = None


async def long_stream(client: httpx.AsyncClient, started: asyncio.Queue, i: int) -> Ending:
    ending = Ending()
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": f"q{i}"}]}
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            ending.router = response.headers.get("x-raystack-router")
            started.put_nowait(i)
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    ending.done = True
                elif line.startswith('data: {"error"'):
                    ending.error = line
                elif line.startswith("data: ") and '"content"' in line:
                    ending.words += 1
    except httpx.HTTPError as err:
        ending.error = repr(err)
    return ending


async def streams_through(base: str, during) -> list[Ending]:
    """STREAMS long streams; once all have started, `during()` runs (in a thread); then every ending."""
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        started: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(long_stream(client, started, i)) for i in range(STREAMS)]
        for _ in range(STREAMS):
            await asyncio.wait_for(started.get(), 60)
        await asyncio.to_thread(during)
        return await asyncio.gather(*tasks)


def app(ttft_ms: float, router: dict[str, Any] | None = None) -> dict[str, Any]:
    backend = synthetic("s", 2, ttft_ms=ttft_ms, tokens_per_s=2, output_tokens=TOKENS)
    return {"models": [{"name": "m", "backends": [backend]}], "router": router or {}}


def test_a_redeploy_under_long_streams_cuts_none(server):
    serve.run(build_app(app(ttft_ms=10)), name="rolling", route_prefix="/rolling")
    try:
        before = set(replica_actors("rolling", "LLMServer-m-s")) | set(replica_actors("rolling", "Router"))
        # A changed backend setting: Serve replaces the backend's replicas and (its args changed) the router's.
        endings = asyncio.run(streams_through(
            f"{server}/rolling", lambda: serve.run(build_app(app(ttft_ms=20)), name="rolling", route_prefix="/rolling")))
        after = set(replica_actors("rolling", "LLMServer-m-s")) | set(replica_actors("rolling", "Router"))
    finally:
        serve.delete("rolling")
    assert not before & after, "the redeploy replaced the replicas"
    assert [(e.done, e.words, e.error) for e in endings] == [(True, TOKENS, None)] * STREAMS


def test_a_router_replica_killed_under_load_cuts_only_its_own_streams(server):
    serve.run(build_app(app(ttft_ms=10, router={"num_replicas": 2})), name="two-routers", route_prefix="/two")
    try:
        routers = replica_actors("two-routers", "Router")
        assert len(routers) == 2
        victim = routers[0]
        endings = asyncio.run(streams_through(
            f"{server}/two", lambda: ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)))
    finally:
        serve.delete("two-routers")
    killed = victim.rsplit("#", 1)[1]
    cut = [e for e in endings if not e.done]
    assert cut and len(cut) < STREAMS, "both routers carried streams"
    assert all(e.router == killed for e in cut), "a stream the other router relayed was cut"
    assert all(e.words == TOKENS and e.error is None for e in endings if e.router != killed)
