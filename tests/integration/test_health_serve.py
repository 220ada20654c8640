"""/health answers from the router's own view of the replicas: it costs no engine a slot, so a load balancer
probing it at peak load keeps the endpoint in, and it follows replicas that die and come back.
/health/models says which models can answer and how many replicas each backend runs."""

from __future__ import annotations

import threading
import time

import httpx
import ray

from raystack.config import backend_app_name
from tests.integration.conftest import deployed, synthetic
from tests.serve_cluster import replica_actors

CAPACITY = 2  # the busy backend's max_ongoing_requests: every slot taken by the streams below


class Stream(threading.Thread):
    """A long chat stream; `streaming` while its tokens arrive (an engine slot is its)."""

    def __init__(self, url: str, model: str):
        super().__init__()
        self.url, self.model = url, model
        self.streaming = threading.Event()
        self.ended = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        body = {"model": self.model, "stream": True, "messages": [{"role": "user", "content": "go"}]}
        try:
            with httpx.stream("POST", f"{self.url}/chat/completions", json=body, timeout=120) as response:
                for _ in response.iter_lines():
                    self.streaming.set()
        except BaseException as err:  # noqa: BLE001  (the test reports it)
            self.error = err
        finally:
            self.ended.set()


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout_s:g} s"
        time.sleep(0.2)


def test_health_stays_200_while_every_backend_slot_is_taken(server):
    busy = synthetic("s", ttft_ms=0, tokens_per_s=10, output_tokens=60, max_ongoing_requests=CAPACITY,
                     max_queued_requests=64)
    with deployed(server, "peak", [{"name": "busy", "backends": [busy]}]) as url:
        streams = [Stream(url, "busy") for _ in range(2 * CAPACITY)]  # as many again wait in the queue
        for stream in streams:
            stream.start()
        wait_for(lambda: sum(s.streaming.is_set() for s in streams) == CAPACITY, 20, "the streams fill the backend")

        took, statuses = [], []
        with httpx.Client(base_url=f"{server}/peak", timeout=10) as client:
            for _ in range(100):
                started = time.monotonic()
                statuses.append(client.get("/health").status_code)
                took.append(time.monotonic() - started)
        assert not any(s.ended.is_set() for s in streams), "the load lasted the whole probe"
        for stream in streams:
            stream.join()
    assert statuses == [200] * 100
    took.sort()
    # Asking an engine would wait for a free slot (seconds here); the router's own view answers at once.
    assert took[49] < 0.05 and took[-1] < 1, f"median {took[49] * 1000:.0f} ms, slowest {took[-1] * 1000:.0f} ms"
    assert [s.error for s in streams] == [None] * len(streams)


def test_health_follows_a_replica_that_dies_and_is_replaced(server):
    models = [
        {"name": "fragile", "backends": [synthetic("s", startup_s=3)]},
        {"name": "idle", "backends": [synthetic("s", autoscaling={"min_replicas": 0, "max_replicas": 1})]},
    ]
    with deployed(server, "follow", models):
        base = f"{server}/follow"
        assert httpx.get(f"{base}/health").status_code == 200
        assert httpx.get(f"{base}/health/models").json()["data"] == [
            {"id": "fragile", "ready": True, "backends": [{"name": "s", "replicas": 1}]},
            {"id": "idle", "ready": True, "backends": [{"name": "s", "replicas": 0}]},  # starts on demand
        ]

        [replica] = replica_actors(backend_app_name("follow", "fragile", "s"), "LLMServer-fragile-s")
        ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)
        wait_for(lambda: httpx.get(f"{base}/health").status_code == 503, 30, "health turns 503")
        down = httpx.get(f"{base}/health")
        assert "fragile" in down.json()["error"]["message"] and "idle" not in down.json()["error"]["message"]
        assert down.headers["retry-after"] == "5"
        fragile = httpx.get(f"{base}/health/models").json()["data"][0]
        assert fragile == {"id": "fragile", "ready": False, "backends": [{"name": "s", "replicas": 0}]}

        wait_for(lambda: httpx.get(f"{base}/health").status_code == 200, 60, "health is 200 again")
        assert replica_actors(backend_app_name("follow", "fragile", "s"), "LLMServer-fragile-s") != [replica]
