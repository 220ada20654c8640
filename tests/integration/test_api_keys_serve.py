"""API keys on the real serving path: a raystack app with two router replicas and router.api_keys from a
file, driven with the openai client. Missing or wrong key -> 401, a model the key may not use -> 403,
/health stays open (/health/models, which names models, does not); a key's limits hold for both router
replicas together; the file edited while serving takes effect, whole or not at all."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from tests.integration.conftest import deployed, synthetic

MODELS = [{"name": "open", "backends": [synthetic("s")]}, {"name": "private", "backends": [synthetic("s")]}]
ASK = [{"role": "user", "content": "hello"}]
KEYS = """\
keys:
  - name: admin
    key: sk-admin
  - name: team
    key: sk-team
    models: [open]
  - name: batch
    key: sk-batch
    requests_per_minute: 8
  - name: agent
    key: sk-agent
    concurrent_requests: 2
"""


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "api_keys"
    keys.write_text(KEYS)
    return keys


@pytest.fixture(scope="module")
def url(server, key_file):
    with deployed(server, "keys", MODELS, router={"api_keys": {"file": str(key_file)}, "num_replicas": 2}) as url:
        yield url


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=30)


def test_a_valid_key_is_served_and_sees_only_its_models(url):
    assert client(url, "sk-admin").chat.completions.create(model="private", messages=ASK, max_tokens=2).choices
    assert client(url, "sk-team").chat.completions.create(model="open", messages=ASK, max_tokens=2).choices
    assert [m.id for m in client(url, "sk-team").models.list()] == ["open"]
    assert [m.id for m in client(url, "sk-admin").models.list()] == ["open", "private"]


def test_missing_or_wrong_key_is_401_in_openai_shape(url):
    with pytest.raises(openai.AuthenticationError) as err:
        client(url, "sk-guess").chat.completions.create(model="open", messages=ASK)
    assert err.value.response.json()["error"]["code"] == "invalid_api_key"
    assert "sk-guess" not in err.value.response.text  # keys are never echoed
    bare = httpx.post(f"{url}/chat/completions", json={"model": "open", "messages": ASK})
    assert bare.status_code == 401 and bare.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in bare.json()["error"]["message"]
    # Authentication comes first: a caller without a key learns nothing from a malformed body either.
    assert httpx.post(f"{url}/chat/completions", content=b"{not json").status_code == 401


def test_a_model_the_key_may_not_use_is_403(url):
    with pytest.raises(openai.PermissionDeniedError, match="may not use the model `private`"):
        client(url, "sk-team").chat.completions.create(model="private", messages=ASK)


def test_health_needs_no_key_and_the_readiness_view_shows_only_what_the_key_may_use(url):
    base = url.removesuffix("/v1")
    assert httpx.get(f"{base}/health").status_code == 200
    assert httpx.get(f"{base}/health/models").status_code == 401
    readiness = httpx.get(f"{base}/health/models", headers={"Authorization": "Bearer sk-team"}).json()["data"]
    assert [(m["id"], m["ready"]) for m in readiness] == [("open", True)]


def ask(url: str, key: str, **extra) -> httpx.Response:
    return httpx.post(f"{url}/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                      json={"model": "open", "messages": ASK, "max_tokens": 2} | extra)


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
    assert ask(url, "sk-admin").status_code == 200  # another key is not held back


def test_concurrent_requests_trips_while_two_answers_stream_and_recovers_when_they_end(url):
    started, streams = threading.Barrier(3), []

    def stream() -> None:
        with httpx.stream("POST", f"{url}/chat/completions", headers={"Authorization": "Bearer sk-agent"},
                          json={"model": "open", "messages": ASK, "max_tokens": 150, "stream": True}, timeout=30) as r:
            streams.append(r.status_code)
            started.wait()
            for _ in r.iter_lines():
                pass

    threads = [threading.Thread(target=stream) for _ in range(2)]
    for thread in threads:
        thread.start()
    started.wait()  # both streams are answering (150 tokens at 50/s: 3 s)
    with pytest.raises(openai.RateLimitError) as over:
        openai.OpenAI(base_url=url, api_key="sk-agent", max_retries=0).chat.completions.create(model="open", messages=ASK)
    assert over.value.body["param"] == "concurrent_requests"
    for thread in threads:
        thread.join()
    assert streams == [200, 200]
    assert ask(url, "sk-agent").status_code == 200  # the slots came back when the streams ended


def served(url: str, key: str, model: str = "open") -> bool:
    try:
        return bool(client(url, key).chat.completions.create(model=model, messages=ASK, max_tokens=2).choices)
    except openai.AuthenticationError:
        return False


def eventually(condition, within_s: float = 15) -> bool:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def test_the_key_file_edited_while_serving_is_read_again_whole_or_not_at_all(url, key_file):
    """Last in the module: it rotates the keys the tests above use."""
    key_file.write_text("keys:\n  - name: team-b\n    key: sk-team-b\n    models: [private]\n"
                        "  - name: admin\n    key: sk-admin\n")
    assert eventually(lambda: served(url, "sk-team-b", "private")), "the new key works within the router's 5 s look"
    assert not served(url, "sk-team")  # rotated out
    with pytest.raises(openai.PermissionDeniedError):
        served(url, "sk-team-b", "open")
    for broken in ("keys:\n  - name: team-c\n    key: sk-team-c\n  - name: team-c\n    key: sk-x\n",  # name twice
                   "keys:\n  - name: team-c\n    key: sk-team-c\n    models: [opne]\n"):  # no such model
        key_file.write_text(broken)
        time.sleep(7)  # past the router's next look
        assert served(url, "sk-team-b", "private") and not served(url, "sk-team-c", "private"), broken
