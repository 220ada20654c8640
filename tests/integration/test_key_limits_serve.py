"""Per-key limits on the real serving path: two router replicas in front of a synthetic backend, keys with
requests_per_minute and concurrent_requests, driven with the openai client and plain HTTP."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from tests.integration.conftest import deployed, synthetic

KEYS = """\
keys:
  - name: batch
    key: sk-batch
    requests_per_minute: 8
  - name: agent
    key: sk-agent
    concurrent_requests: 2
  - name: ops
    key: sk-ops
"""
ASK = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def url(server, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text(KEYS)
    models = [{"name": "m", "backends": [synthetic("s", ttft_ms=0, tokens_per_s=20)]}]
    with deployed(server, "limits", models, router={"api_keys": {"file": str(keys)}, "num_replicas": 2}) as url:
        yield url


def ask(url: str, key: str, **extra) -> httpx.Response:
    return httpx.post(f"{url}/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                      json={"model": "m", "messages": ASK, "max_tokens": 2} | extra)


def test_requests_per_minute_trips_at_its_number_across_both_router_replicas(url):
    answers = [ask(url, "sk-batch") for _ in range(16)]
    admitted = [a for a in answers if a.status_code == 200]
    assert len(admitted) == 8 and [a.status_code for a in answers[8:]] == [429] * 8
    # Both router replicas answered (each alone would have admitted 8): the limit is theirs together.
    assert len({a.headers["x-raystack-router"] for a in answers}) == 2
    error = answers[-1].json()["error"]
    assert error["type"] == "rate_limit_error" and error["param"] == "requests_per_minute"
    assert "key `batch`: requests_per_minute 8" in error["message"] and "sk-batch" not in answers[-1].text
    assert 1 <= int(answers[-1].headers["Retry-After"]) <= 60
    assert ask(url, "sk-ops").status_code == 200  # another key is not held back


def test_concurrent_requests_trips_while_two_answers_stream_and_recovers_when_they_end(url):
    started, streams = threading.Barrier(3), []

    def stream() -> None:
        with httpx.stream("POST", f"{url}/chat/completions", headers={"Authorization": "Bearer sk-agent"},
                          json={"model": "m", "messages": ASK, "max_tokens": 60, "stream": True}, timeout=30) as r:
            streams.append(r.status_code)
            started.wait()
            for _ in r.iter_lines():
                pass

    threads = [threading.Thread(target=stream) for _ in range(2)]
    for thread in threads:
        thread.start()
    started.wait()  # both streams are answering (60 tokens at 20/s: 3 s)
    with pytest.raises(openai.RateLimitError) as over:
        openai.OpenAI(base_url=url, api_key="sk-agent", max_retries=0).chat.completions.create(model="m", messages=ASK)
    assert over.value.body["param"] == "concurrent_requests"
    for thread in threads:
        thread.join()
    assert streams == [200, 200]
    assert ask(url, "sk-agent").status_code == 200  # the slots came back when the streams ended
