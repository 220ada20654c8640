"""A client that leaves mid-stream stops its generation in the engine: the router cancels the stream,
the replica closes the engine's generator, and the engine's own running count drops (Engine.stats)."""

from __future__ import annotations

import time

import httpx
from ray import serve

from raystack.config import deployment_name
from tests.integration.conftest import deployed, synthetic

STREAMS = 4


def engine_stats(app: str) -> dict[str, int]:
    handle = serve.get_deployment_handle(deployment_name("slow", "synthetic"), app_name=app)
    return handle.stats.remote().result(timeout_s=10)


def wait_for(app: str, condition, timeout_s: float = 15) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = engine_stats(app)
        if condition(stats) or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def test_streams_left_mid_way_are_aborted_in_the_engine(server):
    # 10 tokens/s for 1000 tokens: each stream would run 100 s unless its client's leaving stops it.
    with deployed(server, "disconnect", [{"name": "slow", "backends": [synthetic("synthetic", tokens_per_s=10)]}]) as url:
        body = {"model": "slow", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 1000, "stream": True}
        clients = [httpx.Client(timeout=30) for _ in range(STREAMS)]
        streams, readers = [], []  # the line readers too: a reader dropped early would close its stream
        for client in clients:
            stream = client.stream("POST", f"{url}/chat/completions", json=body)
            response = stream.__enter__()
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: ")).startswith("data: {")  # first token
            streams.append(stream)
            readers.append(lines)

        assert wait_for("disconnect", lambda s: s["running"] == STREAMS)["running"] == STREAMS

        for stream, client in zip(streams, clients):  # the clients leave: connections closed mid-stream
            stream.__exit__(None, None, None)
            client.close()
        stats = wait_for("disconnect", lambda s: s["running"] == 0)
        assert stats["running"] == 0, f"the engine still generates for clients that left: {stats}"
        assert (stats["cancelled"], stats["completed"]) == (STREAMS, 0)
