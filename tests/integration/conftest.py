"""Shared by the integration tests that deploy raystack apps on synthetic backends: a fresh local Ray
with Serve per test module, and a helper that deploys one app under its own route prefix."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import ray
from ray import serve

from raystack.app import build_app
from tests.e2e.conftest import free_port


@contextlib.contextmanager
def serve_on_local_ray(**ray_args: Any):
    """A fresh local Ray (2 CPUs, plus `ray_args`) with Serve's HTTP on a free port; yields its URL."""
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", **ray_args)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def server():
    with serve_on_local_ray() as url:
        yield url


def synthetic(name: str, replicas: int = 1, **settings: Any) -> dict[str, Any]:
    backend = {k: settings.pop(k) for k in ("max_ongoing_requests", "max_queued_requests", "autoscaling")
               if k in settings}
    backend.setdefault("autoscaling", {"min_replicas": replicas, "max_replicas": replicas})
    return {"name": name, "engine": "synthetic", "synthetic": settings, **backend}


@contextlib.contextmanager
def deployed(server: str, app: str, models: list[dict[str, Any]], router: dict[str, Any] | None = None):
    """Yields the app's OpenAI base URL."""
    serve.run(build_app({"models": models, "router": router or {}}), name=app, route_prefix=f"/{app}")
    try:
        yield f"{server}/{app}/v1"
    finally:
        serve.delete(app)
