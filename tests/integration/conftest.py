"""Shared by the integration tests that deploy raystack apps: a fresh local Ray with Serve per test module
(tests/serve_cluster.py), synthetic backends, and a helper that deploys one raystack service (its router
under its own route prefix and on a port of its own, each backend an application of its own) with Serve's
Python API."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

from raystack.app import delete_stack, run_stack
from tests.serve_cluster import free_port, serve_cluster


@pytest.fixture(scope="module")
def server():
    with serve_cluster() as running:
        yield running.url


def synthetic(name: str, replicas: int = 1, **settings: Any) -> dict[str, Any]:
    backend = {k: settings.pop(k) for k in ("max_ongoing_requests", "max_queued_requests", "autoscaling")
               if k in settings}
    backend.setdefault("autoscaling", {"min_replicas": replicas, "max_replicas": replicas})
    return {"name": name, "engine": "synthetic", "synthetic": settings, **backend}


@contextlib.contextmanager
def deployed(server: str, app: str, models: list[dict[str, Any]], router: dict[str, Any] | None = None):
    """Yields the service's OpenAI base URL: its router's own port (one hop, router/listener.py), beside
    Serve's proxy, which the module's `server` keeps serving; through that proxy with `router` port: None."""
    router = {"port": free_port(), **(router or {})}
    run_stack({"models": models, "router": router}, name=app, route_prefix=f"/{app}")
    try:
        yield f"http://127.0.0.1:{router['port']}/{app}/v1" if router["port"] else f"{server}/{app}/v1"
    finally:
        delete_stack(app)
