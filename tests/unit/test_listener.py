"""One hop (router/listener.py): where a router listens, what its Entrance does in place of Serve's proxy,
and router replicas sharing one port, on real sockets with uvicorn."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI

from raystack.config import RouterConfig
from raystack.router.listener import Entrance, Listener
from tests.serve_cluster import free_port


@pytest.mark.parametrize(
    "router_port, proxy_location, expected",
    [
        (None, "Disabled", 8000),      # Serve's proxy off: the router takes Serve's port
        (None, "HeadOnly", None),      # Serve's proxy on: it reaches the router, as before
        (9000, "EveryNode", 9000),     # one hop beside the proxy, on a port of its own
        (9000, "Disabled", 9000),      # a second router: its own port
    ],
)
def test_a_router_listens_itself_when_serves_proxy_is_off_or_it_has_a_port(router_port, proxy_location, expected):
    assert RouterConfig(port=router_port).listening_port({"port": 8000}, proxy_location) == expected


def test_a_router_on_the_port_of_serves_own_proxy_is_refused():
    with pytest.raises(ValueError, match="Serve's proxy's port .* Set proxy_location: Disabled"):
        RouterConfig(port=8000).listening_port({"port": 8000}, "HeadOnly")


def held_app(who: int = 0) -> tuple[FastAPI, asyncio.Event]:
    app, release = FastAPI(), asyncio.Event()

    @app.get("/v1/hold")
    async def hold():
        await release.wait()
        return {"by": who}

    @app.get("/v1/models")
    async def models():
        return {"data": [], "by": who}

    return app, release


def in_process(entrance: Entrance) -> httpx.AsyncClient:
    """A client of `entrance` called in this process, as uvicorn would call it."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(entrance), base_url="http://router")


def test_the_entrance_mounts_the_route_prefix_and_answers_the_probes():
    asyncio.run(_the_entrance_mounts_the_route_prefix_and_answers_the_probes())


async def _the_entrance_mounts_the_route_prefix_and_answers_the_probes():
    app, _ = held_app()
    entrance = Entrance(app, "/svc", "svc", ongoing=4, queued=4, retry_after_s=1)
    async with in_process(entrance) as client:
        assert (await client.get("/svc/v1/models")).json() == {"data": [], "by": 0}
        outside = await client.get("/v1/models")
        assert outside.status_code == 404
        assert "answers under /svc/" in outside.json()["error"]["message"]
        assert (await client.get("/-/healthz")).text == "success"
        assert (await client.get("/-/routes")).json() == {"/svc": "svc"}


def test_past_its_ongoing_and_queued_requests_the_entrance_answers_429_with_retry_after():
    asyncio.run(_past_its_ongoing_and_queued_requests_the_entrance_answers_429_with_retry_after())


async def _past_its_ongoing_and_queued_requests_the_entrance_answers_429_with_retry_after():
    app, release = held_app()
    entrance = Entrance(app, "/", "svc", ongoing=1, queued=1, retry_after_s=1)
    async with in_process(entrance) as client:
        running = asyncio.create_task(client.get("/v1/hold"))
        await asyncio.sleep(0.05)
        waiting = asyncio.create_task(client.get("/v1/hold"))
        await asyncio.sleep(0.05)
        refused = await client.get("/v1/hold")
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert "raise router.max_ongoing_requests" in refused.json()["error"]["message"]
        release.set()
        assert [(await r).status_code for r in (running, waiting)] == [200, 200]  # the queued one was kept


def test_replicas_share_one_port_and_one_that_stops_finishes_its_request_while_the_other_takes_new_ones():
    asyncio.run(_replicas_share_one_port_and_one_that_stops_finishes_its_request_while_the_other_takes_new_ones())


async def _replicas_share_one_port_and_one_that_stops_finishes_its_request_while_the_other_takes_new_ones():
    port = free_port()
    apps = [held_app(who) for who in range(2)]
    listeners = [Listener(Entrance(app, "/", "svc", ongoing=32, queued=8, retry_after_s=1), "127.0.0.1", port)
                 for app, _ in apps]
    for listener in listeners:
        listener.start(ready=lambda: True)
    await asyncio.sleep(0.3)
    url = f"http://127.0.0.1:{port}/v1"
    held = [asyncio.create_task(httpx.AsyncClient(timeout=10).get(f"{url}/hold")) for _ in range(16)]
    await asyncio.sleep(0.3)  # sixteen connections: the kernel gives each listener some, on one port
    stopping = asyncio.create_task(listeners[0].stop(timeout_s=10))
    await asyncio.sleep(0.3)
    async with httpx.AsyncClient(timeout=5) as client:  # new connections go to the listener still open
        assert [(await client.get(f"{url}/models")).json()["by"] for _ in range(5)] == [1] * 5
    for _, release in apps:
        release.set()
    answers = [await r for r in held]
    assert [a.status_code for a in answers] == [200] * 16  # the stopping one finished its requests
    assert {a.json()["by"] for a in answers} == {0, 1}  # 2 in 65,536 that the kernel gives one listener all
    await stopping
    await listeners[1].stop(timeout_s=1)
    assert listeners[0].failure() is None and listeners[1].failure() is None


def test_a_port_held_without_so_reuseport_fails_the_replica_with_what_to_do():
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}.*free it, or set router.port"):
            Listener(Entrance(FastAPI(), "/", "svc", 1, 1, 1), "127.0.0.1", port)
