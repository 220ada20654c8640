"""One hop: a router replica takes HTTP requests on its own port, with no Serve proxy in between.

Serve's path is client -> Serve's HTTP proxy (a Python process) -> a handle call -> the Router replica: about
5 ms and 4x fewer short requests per second on two cores (README, "Router overhead"). Ray 2.60's own ways
round the proxy do not fit: direct ingress gives each ingress replica a port of its own (a new one on each
replacement) and balances nothing; its HAProxy ingress binds its stats and metrics ports on every interface
and refuses applications whose ingress has a custom request router, which every backend application has.

So the router's replicas listen themselves, on Serve's `http_options.host`, all on one port with
SO_REUSEPORT: the kernel spreads connections among the replicas of a node, a replacement listens beside the
replica it replaces, and a replica that stops closes its socket first, then finishes what it has. They
listen when Serve's proxy is off (`proxy_location: Disabled`), on `http_options.port`, or on the router's
`port` if set (a second router, or one hop beside Serve's proxy during a migration). Serve's proxy binds
its port with SO_REUSEPORT too (proxy.py, SERVE_SOCKET_REUSE_PORT_ENABLED): a router on the proxy's port
would silently share the connections with it, so that is refused.

What Serve's proxy did for the router, the Entrance does here: Serve's backpressure, the application's
route prefix and the probes' paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from typing import Awaitable, Callable

import uvicorn

from raystack.protocol import error_body

logger = logging.getLogger("ray.serve")

ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]


class Entrance:
    """What Serve's proxy did on the way in, around the Router's ASGI app: its backpressure (`ongoing`
    requests at once, then `queued` waiting for one of them to end, then 429 with Retry-After), the route
    prefix (mounted as Serve's direct ingress mounts it: root_path, the path kept whole), and its
    /-/healthz and /-/routes, which load balancers probe."""

    def __init__(self, app: ASGIApp, route_prefix: str | None, app_name: str, ongoing: int, queued: int,
                 retry_after_s: float):
        self.app = app
        self.prefix = "" if route_prefix in (None, "/") else route_prefix.rstrip("/")
        self.routes = json.dumps({route_prefix or "/": app_name}).encode()
        self.slots = asyncio.Semaphore(ongoing)
        self.queued = queued
        self.waiting = 0
        self.busy = json.dumps(error_body(
            429, f"The router is at its limit ({ongoing} requests at once, {queued} waiting). Retry after "
                 f"{retry_after_s:g} s, or raise router.max_ongoing_requests or num_replicas.")).encode()
        self.retry_after = str(max(1, round(retry_after_s))).encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path in ("/-/healthz", "/-/routes"):
            body = self.routes if path == "/-/routes" else b"success"
            return await self._answer(send, 200, body, b"application/json" if path == "/-/routes" else b"text/plain")
        if self.prefix:
            if path != self.prefix and not path.startswith(self.prefix + "/"):
                return await self._answer(send, 404, json.dumps(error_body(
                    404, f"No route {path}: this router answers under {self.prefix}/")).encode())
            scope = {**scope, "root_path": scope.get("root_path", "") + self.prefix}
        if self.slots.locked():
            if self.waiting >= self.queued:
                return await self._answer(send, 429, self.busy, extra=[(b"retry-after", self.retry_after)])
            self.waiting += 1
            try:
                await self.slots.acquire()
            finally:
                self.waiting -= 1
        else:
            await self.slots.acquire()
        try:
            await self.app(scope, receive, send)
        finally:
            self.slots.release()

    @staticmethod
    async def _answer(send: Callable, status: int, body: bytes, content_type: bytes = b"application/json",
                      extra: list[tuple[bytes, bytes]] = ()) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type), *extra]})
        await send({"type": "http.response.body", "body": body})


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield  # the replica's signals are Ray's


class Listener:
    """A router replica's own HTTP server on (host, port), shared with the other replicas of the node."""

    def __init__(self, entrance: Entrance, host: str, port: int):
        self.socket = self._bind(host, port)  # here, so a port that cannot be had fails the replica's start
        self.server = _Server(uvicorn.Config(
            entrance, lifespan="off", log_config=None, access_log=False,
            # uvicorn's default 5 s closes pooled client connections under a pause in the load: each
            # reconnect costs the client a round trip. Serve's proxy keeps them 90 s (its keep_alive_timeout_s).
            timeout_keep_alive=90))
        self.serving: asyncio.Task | None = None
        self.where = f"{host}:{port}{entrance.prefix}"

    @staticmethod
    def _bind(host: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            sock.close()
            raise OSError(err.errno, f"the router cannot listen on {host}:{port}: {err.strerror}. Another program "
                                     f"holds the port without SO_REUSEPORT: free it, or set router.port") from None
        return sock

    def start(self, ready: Callable[[], bool]) -> None:
        """Accept connections once `ready()` (the Router constructed: Serve gives its routes their `self`
        only then), from the running loop."""
        self.serving = asyncio.create_task(self._serve(ready))

    async def _serve(self, ready: Callable[[], bool]) -> None:
        while not ready() and not self.server.should_exit:
            await asyncio.sleep(0.02)
        logger.info("router listening on %s", self.where)
        await self.server.serve(sockets=[self.socket])  # until stop(): then uvicorn's own graceful shutdown

    def failure(self) -> str | None:
        """Why the listener stopped serving, if it did before it was asked to."""
        if self.serving is None or not self.serving.done() or self.server.should_exit:
            return None
        err = self.serving.exception() if not self.serving.cancelled() else None
        return f"the router stopped listening on {self.where}: {err!r}"

    async def stop(self, timeout_s: float) -> None:
        """Stop accepting (the node's other replicas take new connections), end idle connections, and let
        requests under way finish for up to `timeout_s`."""
        if self.serving is None:
            self.socket.close()
            return
        self.server.config.timeout_graceful_shutdown = timeout_s
        self.server.should_exit = True
        with contextlib.suppress(Exception):
            await self.serving
