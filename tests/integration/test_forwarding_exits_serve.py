"""Every way a request can end gives its backend's in-flight slot back and stops the generation upstream,
once: a request's Exchange and the router's Forwarder, driven here as the ingress drives them, with real
Serve handles to a real LLMServer (synthetic engine), left at each point a client can leave. Leaks here skew
least_loaded routing for good and keep engines generating for nobody. Nothing here collects garbage by hand:
a response dropped unsent is closed when it is freed.

Each scenario runs in a Ray worker, as the Router's Forwarder does, not in this test process: a driver
that has held Serve handles to an earlier module's cluster keeps Serve's handle machinery (its router
thread and long-poll clients) from then on, and its requests to this cluster could wait without end."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray
from ray import serve

from raystack.app import delete_stack, run_stack
from raystack.config import backend_app_name, parse_config
from raystack.observability.metrics import RouterMetrics
from raystack.router.catalogue import Catalogue, registered_backends, serve_details
from raystack.router.exchange import Exchange
from raystack.router.forwarding import Forwarder
from tests.integration.conftest import synthetic

CHAT = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "count"}]}
KEY = ("m", "s")


@pytest.fixture(scope="module")
def handle(server):
    args = {"models": [{"name": "m", "backends": [synthetic("s", ttft_ms=300, tokens_per_s=20, output_tokens=200)]}]}
    run_stack(args, name="exits", route_prefix="/exits")
    yield parse_config(args), serve.get_deployment_handle("LLMServer-m-s", app_name=backend_app_name("exits", "m", "s"))
    delete_stack("exits")


async def settled(forwarder: Forwarder, handle, timeout_s: float = 10) -> tuple[int, int]:
    """(the router's in-flight count, the engine's running count) once both are 0, or at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        running = (await asyncio.wait_for(handle.stats.remote(), 10))["running"]
        if (forwarder.in_flight[KEY] == 0 and running == 0) or time.monotonic() > deadline:
            return forwarder.in_flight[KEY], running
        await asyncio.sleep(0.2)


def exchange(model, **body) -> Exchange:
    """A request without an API key, as the ingress has checked it."""
    return Exchange("chat", None, RouterMetrics(), body={**CHAT, **body}, requested="m", model=model)


@ray.remote(num_cpus=0)
def _play(config, backend, leave) -> tuple[int, int]:
    async def run():
        forwarder = Forwarder(config.router, RouterMetrics())
        forwarder.update(Catalogue.of(config.router, registered_backends(serve_details(), "exits")))
        await asyncio.wait_for(leave(forwarder, config.models[0]), 60)
        return await settled(forwarder, backend)

    return asyncio.run(run())


def scenario(handle, leave) -> tuple[int, int]:
    config, backend = handle
    return ray.get(_play.remote(config, backend, leave), timeout=120)


def test_a_stream_left_before_it_was_iterated(handle):
    async def leave(forwarder, model):
        request = exchange(model)
        body = request.streamed(forwarder.relay(await forwarder.send(request)))  # what the ingress returns
        assert forwarder.in_flight[KEY] == 1
        del request, body  # the client left before a byte was sent: the response is dropped

    assert scenario(handle, leave) == (0, 0)


def test_a_stream_left_after_some_chunks_and_closed_again(handle):
    async def leave(forwarder, model):
        request = exchange(model)
        body = request.streamed(forwarder.relay(await forwarder.send(request)))
        for _ in range(3):
            await body.__anext__()
        await body.aclose()
        request.close()  # a second close acts no more: the slot was given back once

    assert scenario(handle, leave) == (0, 0)


def test_a_request_left_while_waiting_for_its_first_token(handle):
    async def leave(forwarder, model):
        request = exchange(model)
        opening = asyncio.ensure_future(forwarder.send(request))
        await asyncio.sleep(0.1)  # the engine's first token is 300 ms away
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        request.close()  # as the ingress does on its way out
        assert request.delivery is None

    assert scenario(handle, leave) == (0, 0)


def test_a_whole_answer_and_a_finished_stream(handle):
    async def leave(forwarder, model):
        whole = exchange(model, stream=False, max_tokens=3)
        await forwarder.send(whole)
        await whole.answered_whole()
        streamed = exchange(model, max_tokens=3)
        body = streamed.streamed(forwarder.relay(await forwarder.send(streamed)))
        assert "".join([chunk async for chunk in body]).endswith("data: [DONE]\n\n")

    assert scenario(handle, leave) == (0, 0)
