"""Updates and router failures under long streams, on synthetic backends, deployed as `serve deploy` applies
a config file, the router taking requests on its own port (one hop, router/listener.py): a changed backend
is redeployed alone (not the router, not the other backends) and finishes every stream it found; a changed
router is replaced with no stream cut and no request refused; a router replica killed under load cuts only
the streams it was relaying.

The streams last longer than Serve's default drain (20 s) and the one raystack used to set (30 s)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest
import ray

from tests.integration.conftest import synthetic
from tests.serve_cluster import free_port, replica_actors, serve_deploy

STREAMS = 16
TOKENS = 70  # at 2 tokens/s: 35 s a stream
PORT = free_port()
BASE = f"http://127.0.0.1:{PORT}/rolling"


class Ending:
    def __init__(self) -> None:
        self.router: str | None = None
        self.replica: str | None = None  # the backend replica that answered
        self.words = 0
        self.done = False
        self.error: str | None = None


async def long_stream(client: httpx.AsyncClient, started: asyncio.Queue, i: int, model: str) -> Ending:
    ending = Ending()
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": f"q{i}"}]}
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            ending.router = response.headers.get("x-raystack-router")
            ending.replica = response.headers.get("x-raystack-replica")
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


async def long_whole(client: httpx.AsyncClient, started: asyncio.Queue, i: int, model: str) -> Ending:
    """long_stream's request asked whole: it answers once all its tokens are made, over the chunk channel when
    its replica has connected to the router already (replica/direct_answers.py). Started once sent."""
    ending = Ending()
    body = {"model": model, "messages": [{"role": "user", "content": f"q{i}"}]}
    request = asyncio.ensure_future(client.post("/v1/chat/completions", json=body))
    await asyncio.sleep(0.5)  # on its way to a replica
    started.put_nowait(i)
    try:
        response = await request
    except httpx.HTTPError as err:
        ending.error = repr(err)
        return ending
    ending.router = response.headers.get("x-raystack-router")
    ending.replica = response.headers.get("x-raystack-replica")
    if response.status_code != 200:
        ending.error = response.text
        return ending
    ending.words, ending.done = len(response.json()["choices"][0]["message"]["content"].split()), True
    return ending


async def streams_through(base: str, during, models: tuple[str, ...] = ("m",), ask=long_stream) -> list[Ending]:
    """STREAMS long streams (or whole answers: `ask` long_whole) to each of `models`; once all have started,
    `during()` runs (in a thread); then every ending."""
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        started: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(ask(client, started, i, model))
                 for model in models for i in range(STREAMS)]
        for _ in tasks:
            await asyncio.wait_for(started.get(), 60)
        await asyncio.to_thread(during)
        return await asyncio.gather(*tasks)


def service(router: dict[str, Any], backends: dict[str, float]) -> dict[str, Any]:
    """A config file's applications: a router `rolling` under /rolling and, for each backend name -> first
    token delay, a model of that name with one synthetic backend, an application of its own."""
    return {"applications": [
        {"name": "rolling", "route_prefix": "/rolling", "import_path": "raystack.app:build_router",
         "args": {"port": PORT, **router}},
        *({"name": f"rolling.{name}.s", "route_prefix": None, "import_path": "raystack.app:build_backend",
           "args": {"router": "rolling", "model": {"name": name},
                    "backend": synthetic("s", 2, ttft_ms=ttft_ms, tokens_per_s=2, output_tokens=TOKENS)}}
          for name, ttft_ms in backends.items()),
    ]}


def replicas() -> dict[str, set[str]]:
    return {"router": set(replica_actors("rolling", "Router")),
            "m": set(replica_actors("rolling.m.s", "LLMServer-m-s")),
            "other": set(replica_actors("rolling.other.s", "LLMServer-other-s"))}


async def connect_replicas(base: str, models: tuple[str, ...]) -> None:
    """One-token answers to each of `models`, enough at once to reach each of its replicas: each then connects
    to the router's inbox, and whole answers go over that connection with no Serve call."""
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        await asyncio.gather(*(client.post("/v1/chat/completions", json={**body, "model": model})
                               for model in models for _ in range(STREAMS)))


@pytest.mark.parametrize("ask", [long_stream, long_whole], ids=["streams", "whole answers"])
def test_a_changed_backend_is_redeployed_alone_and_cuts_no_stream(server, ask):
    serve_deploy(service({}, {"m": 10, "other": 10}))
    asyncio.run(connect_replicas(BASE, ("m", "other")))
    before = replicas()
    # serve deploy of the same file with one backend setting changed: Serve replaces that backend's
    # replicas, each once its answers are done; the router and the other backend keep theirs.
    endings = asyncio.run(streams_through(
        BASE, lambda: serve_deploy(service({}, {"m": 20, "other": 10})), models=("m", "other"), ask=ask))
    after = replicas()
    assert not before["m"] & after["m"] and len(after["m"]) == 2, "the changed backend's replicas were replaced"
    assert (after["router"], after["other"]) == (before["router"], before["other"]), "only the changed backend"
    assert [(e.done, e.words, e.error) for e in endings] == [(True, TOKENS, None)] * (2 * STREAMS)
    # Each answered where it started: none was cut by its replica stopping and sent again to a new one.
    old = {actor.rsplit("#", 1)[1] for actor in before["m"] | before["other"]}
    assert {e.replica for e in endings} <= old


def test_a_router_replica_killed_under_load_cuts_only_its_own_streams(server):
    serve_deploy(service({"num_replicas": 2}, {"m": 10}))
    routers = replica_actors("rolling", "Router")
    assert len(routers) == 2
    victim = routers[0]
    endings = asyncio.run(streams_through(
        BASE, lambda: ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)))
    killed = victim.rsplit("#", 1)[1]
    cut = [e for e in endings if not e.done]
    assert cut and len(cut) < STREAMS, "both routers carried streams"
    assert all(e.router == killed for e in cut), "a stream the other router relayed was cut"
    assert all(e.words == TOKENS and e.error is None for e in endings if e.router != killed)


async def short_requests_until(stop: asyncio.Event) -> tuple[int, list[str]]:
    """Whole answers of one token, one after another on a pooled client as a user's would be, until `stop`:
    (answered, failures). The openai client resends a request whose pooled connection the server closed."""
    answered, failures = 0, []
    async with openai.AsyncOpenAI(base_url=f"{BASE}/v1", api_key="none", timeout=30) as client:
        while not stop.is_set():
            try:
                await client.chat.completions.create(model="m", max_tokens=1,
                                                     messages=[{"role": "user", "content": "hi"}])
                answered += 1
            except openai.OpenAIError as err:
                failures.append(repr(err))
    return answered, failures


def test_a_changed_router_is_replaced_with_no_stream_cut_and_no_request_refused(server):
    serve_deploy(service({"num_replicas": 2}, {"m": 10}))
    before = set(replica_actors("rolling", "Router"))

    async def update_under_load() -> tuple[list[Ending], tuple[int, list[str]]]:
        stop = asyncio.Event()
        shorts = asyncio.create_task(short_requests_until(stop))
        # The router's own args changed: Serve starts new replicas, which listen beside the old ones on the
        # same port, then stops the old ones, which close their sockets and relay their streams to the end.
        endings = await streams_through(BASE, lambda: serve_deploy(service(
            {"num_replicas": 2, "first_token_timeout_s": 200}, {"m": 10})))
        stop.set()
        return endings, await shorts

    endings, (answered, failures) = asyncio.run(update_under_load())
    after = set(replica_actors("rolling", "Router"))
    assert not before & after and len(after) == 2, "the router's replicas were replaced"
    assert [(e.done, e.words, e.error) for e in endings] == [(True, TOKENS, None)] * STREAMS
    assert failures == [] and answered > 20
