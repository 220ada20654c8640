"""Shared by the integration tests that deploy raystack apps: a local Ray with Serve (tests/serve_cluster.py)
that the modules needing nothing else share, synthetic backends, and a helper that deploys one raystack
service (its router under its own route prefix and on a port of its own, each backend an application of its
own) with Serve's Python API."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest

from raystack.app import delete_stack, run_stack
from tests.serve_cluster import clear_applications, free_port, kept_serve_cluster, release_kept_serve_cluster

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def server():
    """Serve's URL on a plain local Ray, which the modules using this fixture share (they run one after
    another: pytest_collection_modifyitems); each gets it with no application of the one before."""
    yield kept_serve_cluster().url
    clear_applications()


@pytest.fixture(scope="package", autouse=True)
def _release_the_kept_cluster():
    yield
    release_kept_serve_cluster()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules on the shared cluster (those using `server` without a fixture of their own by that name,
    nor a parameter) first, so that it starts once; otherwise in pytest's order."""
    def on_shared_cluster(item: pytest.Item) -> bool:
        parametrized = item.callspec.params if hasattr(item, "callspec") else {}
        return "server" in item.fixturenames and "server" not in vars(item.module) and "server" not in parametrized

    here = [i for i, item in enumerate(items) if Path(item.path).parent == HERE]
    shared = {items[i].path for i in here if on_shared_cluster(items[i])}
    ordered = sorted((items[i] for i in here), key=lambda item: item.path not in shared)
    for i, item in zip(here, ordered):
        items[i] = item


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
