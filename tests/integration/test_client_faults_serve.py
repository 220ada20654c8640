"""Clients that misbehave cost nothing lasting. One that leaves mid-stream stops its generation in the
engine: the router cancels the stream, the replica closes the engine's generator, and the engine's own
running count drops (Engine.stats). One that stalls while sending its body gets a 408."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

import httpx

from raystack.config import backend_app_name, deployment_name
from tests import serve_cluster
from tests.integration.conftest import deployed, synthetic

STREAMS = 4


def engine_stats(app: str) -> dict[str, int]:
    return serve_cluster.engine_stats(backend_app_name(app, "slow", "synthetic"), deployment_name("slow", "synthetic"))


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


def read_response(conn: socket.socket) -> str:
    """One HTTP/1.1 response with a Content-Length, however the server splits its writes."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = conn.recv(65536)
        assert more, f"the connection closed before a whole response: {data!r}"
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(body) < length:
        more = conn.recv(65536)
        if not more:
            break
        body += more
    return (head + b"\r\n\r\n" + body).decode()


def test_a_body_that_stops_arriving_is_408_after_body_timeout_s(server):
    models = [{"name": "slow", "backends": [synthetic("synthetic")]}]
    with deployed(server, "stall", models, router={"body_timeout_s": 1}) as url:
        where = urlsplit(url)
        with socket.create_connection((where.hostname, where.port), timeout=15) as conn:
            # Promises 100 bytes, sends 10, then waits: as a stalled or malicious client would.
            conn.sendall(f"POST {where.path}/chat/completions HTTP/1.1\r\nHost: {where.hostname}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"model\": ".encode())
            started = time.monotonic()
            reply = read_response(conn)
        assert reply.startswith("HTTP/1.1 408"), reply
        assert "router.body_timeout_s" in reply and time.monotonic() - started < 10
