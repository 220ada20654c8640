"""Serve's proxy ends a request at http_options.request_timeout_s with no error event and no [DONE]; the
router's own bound ends it with both. With the proxy's bound set (8 s, as a cluster config sets one), the
router refuses to deploy under a longer bound of its own, and under a shorter one it is the router's bound
a client meets: an error event, then [DONE]."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from raystack.app import build_router, delete_stack, run_stack
from raystack.config import ConfigError
from tests.integration.conftest import synthetic
from tests.serve_cluster import serve_cluster

PROXY_TIMEOUT_S = 8


@pytest.fixture(scope="module")
def server():
    with serve_cluster(http={"request_timeout_s": PROXY_TIMEOUT_S}) as running:
        yield running.url


def slow_model() -> list[dict]:  # 200 words at 10 a second: 20 s, past both bounds
    return [{"name": "slow", "backends": [synthetic("slow", ttft_ms=0, tokens_per_s=10, output_tokens=200)]}]


def test_a_router_bound_longer_than_the_proxys_is_refused(server):
    with pytest.raises(ConfigError, match=r"http_options.request_timeout_s \(8 s\) is shorter than "
                                          r"router.request_timeout_s \(3600 s\)"):
        build_router({})


def test_the_client_meets_the_routers_bound_with_an_error_event(server):
    router = {"request_timeout_s": 3, "first_token_timeout_s": 3}
    run_stack({"models": slow_model(), "router": router}, name="bounded", route_prefix="/bounded")
    try:
        started = time.monotonic()
        events = []
        with httpx.stream("POST", f"{server}/bounded/v1/chat/completions", timeout=30,
                          json={"model": "slow", "stream": True, "messages": [{"role": "user", "content": "go"}]}) as r:
            assert r.status_code == 200
            events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
        elapsed = time.monotonic() - started
        assert events[-1] == "[DONE]", events[-3:]
        error = json.loads(events[-2])["error"]
        assert error["code"] == 504 and "router.request_timeout_s" in error["message"]
        assert 3 <= elapsed < PROXY_TIMEOUT_S  # the router's bound, before the proxy's silent cut
    finally:
        delete_stack("bounded")
