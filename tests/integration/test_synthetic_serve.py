"""The real stack with engine: synthetic: deploy_configs/synthetic.yaml as `serve deploy` applies it (the
router, and a synthetic backend of 2 replicas as an application of its own), Ray Serve on a fresh local Ray,
driven with the official openai client.
No model and no vLLM: the whole serving path in seconds."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.serve_cluster import serve_cluster, serve_deploy

ROOT = Path(__file__).resolve().parents[2]
MODEL = "synthetic"
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Say something nice"}]
PROMPT_WORDS = 2 + 3


@pytest.fixture(scope="module")
def base_url():
    config = yaml.safe_load((ROOT / "deploy_configs/synthetic.yaml").read_text())
    with serve_cluster() as running:
        serve_deploy({"applications": config["applications"]})  # the test's own HTTP port, not the file's
        yield running.url


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_health_and_models_list_the_sourceless_model(base_url):
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}
    [model] = httpx.get(f"{base_url}/v1/models").json()["data"]
    assert (model["id"], model["backends"]) == (MODEL, ["synthetic"])


def test_chat_whole_and_streamed_agree_with_word_usage(client):
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8)
    assert whole.id.startswith("chatcmpl-") and whole.model == MODEL
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert len(choice.message.content.split()) == 8
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (
        PROMPT_WORDS, 8, PROMPT_WORDS + 8)

    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # deterministic, whichever replica answered
    assert len([c for c in chunks if c.choices]) > 1, "tokens arrive as separate chunks"
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == PROMPT_WORDS


def test_completion_whole_and_streamed(client):
    whole = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6,
                                      extra_body={"ignore_eos": True})
    assert whole.id.startswith("cmpl-") and whole.object == "text_completion"
    assert whole.usage.prompt_tokens == 4 and whole.usage.completion_tokens == 6
    assert whole.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.total_tokens == 10


def test_default_length_is_the_backends_output_tokens(client):
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert reply.usage.completion_tokens == 64 and reply.choices[0].finish_reason == "stop"


def test_backend_pin_and_unknown_names_are_404(client):
    assert client.chat.completions.create(model=f"{MODEL}@synthetic", messages=MESSAGES, max_tokens=2).model == MODEL
    with pytest.raises(openai.NotFoundError, match="no backend `vllm`"):
        client.chat.completions.create(model=f"{MODEL}@vllm", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    message = err.value.response.json()["error"]["message"]
    assert "gpt-9" in message and MODEL in message


def test_beyond_the_context_is_400_naming_the_numbers(client):
    # max_tokens alone too long: the router answers, no engine is asked.
    with pytest.raises(openai.BadRequestError, match="maximum context length is 4096 tokens") as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5000)
    assert err.value.body["param"] == "max_tokens" and "5000" in err.value.body["message"]
    # Prompt plus max_tokens too long: the engine, which counts the prompt, answers.
    long_prompt = [{"role": "user", "content": "word " * 4000}]
    with pytest.raises(openai.BadRequestError, match=r"requested 4100 tokens \(4000 in the messages, 100"):
        client.chat.completions.create(model=MODEL, messages=long_prompt, max_tokens=100)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_the_size_limit_is_413_before_it_is_read(base_url, chunked):
    limit = 8 << 20  # router.max_request_bytes' default
    body = b'{"model": "synthetic", "messages": [{"role": "user", "content": "' + b"x" * limit + b'"}]}'
    content = iter([body[i:i + 65536] for i in range(0, len(body), 65536)]) if chunked else body
    response = httpx.post(f"{base_url}/v1/chat/completions", content=content,
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and "router.max_request_bytes" in error["message"]
