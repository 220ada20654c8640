"""Priority classes on the real serving path: a raystack app whose keys file gives each key a class, one
router replica in front of a backend of 4 slots (synthetic engine: 20 tokens a second), driven over HTTP.
Batch work holds at most 3 of the 4 slots, so a chat request starts at once beside it; when the backend
saturates, the waiting batch requests are refused first (429, Retry-After) and the more urgent ones get the
slots; a request may lower its class, never raise it; the class shows in the answer's header, the router's
access log, its metrics and `raystack usage`."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import ray

from tests.integration.conftest import deployed, synthetic
from tests.integration.test_api_keys_serve import eventually
from tests.integration.test_metrics_serve import scrape
from tests.prometheus import total

MODELS = [{"name": "m", "backends": [synthetic("s", tokens_per_s=20, ttft_ms=20, max_ongoing_requests=4)]}]
KEYS = """\
keys:
  - name: chat
    key: sk-chat
    priority: interactive
  - name: jobs
    key: sk-jobs
    priority: batch
  - name: team
    key: sk-team
"""


@pytest.fixture(scope="module")
def url(server, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "api_keys"
    keys.write_text(KEYS)
    with deployed(server, "prio", MODELS, router={"api_keys": {"file": str(keys)}}) as url:
        yield url


def ask(url: str, key: str, max_tokens: int = 2, headers: dict | None = None, **extra) -> httpx.Response:
    return httpx.post(f"{url}/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {key}", **(headers or {})},
                      json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
                            **extra})


class Load:
    """`n` clients of `key` asking one answer of `tokens` tokens after another; a 429 is noted and retried
    after its Retry-After, as a batch client does."""

    def __init__(self, url: str, key: str, n: int, tokens: int):
        self.statuses: list[int] = []
        self.retry_after: set[str] = set()
        self.refusals: list[str] = []  # the 429s' messages
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(url, key, tokens)) for _ in range(n)]

    def _client(self, url: str, key: str, tokens: int) -> None:
        while not self.stop.is_set():
            answer = ask(url, key, max_tokens=tokens)
            self.statuses.append(answer.status_code)
            if answer.status_code == 429:
                self.retry_after.add(answer.headers.get("retry-after"))
                self.refusals.append(answer.json()["error"]["message"])
                self.stop.wait(float(answer.headers.get("retry-after", 1)))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def test_a_chat_request_starts_at_once_while_batch_work_fills_the_backend(url):
    """8 batch clients want the 4 slots (2 s answers): batch holds 3, the 4th stays free for the classes above.
    First come first served, a chat request would wait about 2 s / 4 for a slot, then its own answer."""
    with Load(url, "sk-jobs", n=8, tokens=40) as batch:
        time.sleep(3)
        waits = []
        for _ in range(5):
            started = time.monotonic()
            answer = ask(url, "sk-chat", max_tokens=1)
            waits.append(time.monotonic() - started)
            assert answer.status_code == 200 and answer.headers["x-raystack-priority"] == "interactive"
            time.sleep(0.3)
    assert max(waits) < 0.5, waits  # 20 ms to the token, and no queue
    assert 200 in batch.statuses  # batch work goes on beside it


def test_a_saturated_backend_refuses_waiting_batch_first_and_serves_the_others(url):
    """Batch holds its 3 slots and more batch waits; then 3 requests of the standard class want slots: one
    takes the free slot, the others must wait, so the waiting batch requests are refused at once."""
    with Load(url, "sk-jobs", n=6, tokens=60) as batch:
        time.sleep(1.5)
        answers: list[httpx.Response] = []
        team = [threading.Thread(target=lambda: answers.append(ask(url, "sk-team", max_tokens=5))) for _ in range(3)]
        for thread in team:
            thread.start()
        for thread in team:
            thread.join()
        time.sleep(0.5)
    assert [a.status_code for a in answers] == [200] * 3
    assert {a.headers["x-raystack-priority"] for a in answers} == {"standard"}
    assert 429 in batch.statuses and batch.retry_after == {"1"}
    assert any("requests of class `batch` give way to more urgent ones" in m for m in batch.refusals), batch.refusals
    assert eventually(lambda: total(scrape(), "ray_raystack_requests_refused_total", model="m", **{"class": "batch"},
                                    reason="shed") >= 1, within_s=60)
    assert any(n == "ray_raystack_queue_depth" and labels.get("class") == "batch" for n, labels, _ in scrape())


def test_a_request_may_lower_its_class_but_not_raise_it(url):
    assert ask(url, "sk-chat", headers={"x-raystack-priority": "batch"}).headers["x-raystack-priority"] == "batch"
    assert ask(url, "sk-chat", priority=1).headers["x-raystack-priority"] == "standard"  # vLLM's integer
    assert ask(url, "sk-jobs", headers={"x-raystack-priority": "interactive"}).headers["x-raystack-priority"] == "batch"
    unknown = ask(url, "sk-team", headers={"x-raystack-priority": "urgent"})
    assert unknown.status_code == 400
    assert unknown.json()["error"]["param"] == "x-raystack-priority"
    assert "interactive, standard, batch" in unknown.json()["error"]["message"]


def test_the_class_is_in_the_access_log_the_metrics_and_raystack_usage(url):
    assert ask(url, "sk-chat").status_code == 200
    assert ask(url, "sk-jobs").status_code == 200
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"

    def logged() -> list[str]:
        # The router replica's stderr, which Ray's log monitor shows as it comes.
        files = logs.glob("worker-*.err")
        return [line for log in files for line in log.read_text(errors="replace").splitlines()
                if "POST /v1/chat/completions 200" in line and "key=chat class=interactive" in line]

    assert eventually(logged)
    assert "model=m backend=s" in logged()[0] and "sk-chat" not in "".join(logged())

    def waited(priority: str) -> float:
        return total(scrape(), "ray_raystack_queue_wait_seconds_count", model="m", **{"class": priority})

    assert eventually(lambda: waited("interactive") >= 1 and waited("batch") >= 1, within_s=60)
    assert total(scrape(), "ray_raystack_key_requests_total", key="jobs", model="m", **{"class": "batch"}) >= 1

    gcs = ray.get_runtime_context().gcs_address

    def usage() -> dict[tuple[str, str], int]:
        out = subprocess.run([str(Path(sys.executable).with_name("raystack")), "usage", "--json", "--app", "prio",
                              "--address", gcs, "--since", "1h"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return {(r["key"], r["class"]): r["requests"] for r in json.loads(out.stdout)}

    assert eventually(lambda: usage().get(("chat", "interactive"), 0) >= 1 and usage().get(("jobs", "batch"), 0) >= 1,
                      within_s=30)


def test_a_client_that_leaves_while_queued_gives_up_its_place_at_once(url):
    """The backend's 4 slots busy for 3 s; a request queued behind them whose client gives up after 0.5 s
    ends then (499 in the access log), instead of waiting for a slot and being answered to nobody."""
    busy = [threading.Thread(target=ask, args=(url, "sk-team"), kwargs={"max_tokens": 60}) for _ in range(4)]
    for thread in busy:
        thread.start()
    time.sleep(0.5)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/chat/completions", headers={"Authorization": "Bearer sk-chat"}, timeout=0.5,
                   json={"model": "m", "messages": [{"role": "user", "content": "left"}], "max_tokens": 2})
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"

    def left() -> list[float]:
        files = [*logs.glob("serve/replica_prio_Router_*.log"), *logs.glob("worker-*.err")]
        return [float(line.split(" 499 ")[1].split("s ")[0]) for log in files
                for line in log.read_text(errors="replace").splitlines() if " 499 " in line and "key=chat" in line]

    assert eventually(left, within_s=10)
    assert min(left()) < 1.5  # it ended as its client left, not when a slot freed (3 s)
    for thread in busy:
        thread.join()
