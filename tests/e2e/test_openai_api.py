"""The OpenAI API of the embedded default, driven with the official openai client."""

import contextlib
import time

import httpx
import openai
import pytest

from tests.e2e.conftest import EngineWatch, session_port
from tests.prometheus import parse_prometheus, total

MODEL = "smollm2"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def chat_prompt_tokens(tokenizer, messages):
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])


def test_health_and_models(stack, client):
    assert httpx.get(f"{stack['base_url']}/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == [MODEL]


@pytest.mark.parametrize("question, fact", [("What is the capital of France?", "Paris"),
                                            ("What is the capital of Germany?", "Berlin")])
def test_the_embedded_default_answers_a_known_fact_at_temperature_0(client, question, fact):
    # In bfloat16, vLLM CPU answered France with "L'Étoile, la Marseillaise, ..." on an AMX CPU.
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                           max_tokens=16, temperature=0)
    assert fact in reply.choices[0].message.content, reply.choices[0].message.content


def test_chat_usage_agrees_with_the_tokenizer(client, tokenizer):
    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    choice = reply.choices[0]
    assert reply.model == MODEL and choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert reply.usage.prompt_tokens == chat_prompt_tokens(tokenizer, MESSAGES)
    assert reply.usage.completion_tokens == 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 8


def test_chat_stream_is_incremental_and_matches_the_whole_answer(client, tokenizer):
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) > 1, "tokens should arrive as separate chunks, not one blob"
    assert text == whole.choices[0].message.content
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    assert usage.prompt_tokens == chat_prompt_tokens(tokenizer, MESSAGES)
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_completion_non_stream_and_stream(client, tokenizer):
    prompt = "The capital of France is"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert whole.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    assert whole.usage.completion_tokens == 6
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 6


def assert_openai_error(body, status):
    error = body["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["message"]
    return error


def test_unknown_model_is_404(stack, client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    error = assert_openai_error(err.value.response.json(), 404)
    assert "gpt-9" in error["message"] and MODEL in error["message"]  # names what exists


def test_backend_pin_reaches_the_named_backend_and_rejects_others(client):
    reply = client.chat.completions.create(model=f"{MODEL}@vllm", messages=MESSAGES, max_tokens=2)
    assert reply.model == MODEL
    with pytest.raises(openai.NotFoundError, match="no backend `mindie`"):
        client.chat.completions.create(model=f"{MODEL}@mindie", messages=MESSAGES, max_tokens=2)


def test_each_priority_class_is_answered_by_vllms_priority_scheduler(client):
    """local.yaml's vLLM runs scheduling_policy: priority (raystack's default), and each request carries its
    class as vLLM's integer; the answer names the class it was served in."""
    for header, priority, served in ((None, None, "standard"), ("batch", None, "batch"), (None, 2, "batch"),
                                     ("interactive", None, "standard")):  # no key: the default class at most
        reply = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=2, extra_headers={"x-raystack-priority": header} if header else None,
            extra_body={"priority": priority} if priority is not None else None)
        assert reply.headers["x-raystack-priority"] == served and reply.parse().choices[0].message.content


@pytest.mark.parametrize(
    "content",
    [b"{this is not json", b'{"model": "smollm2", "messages": []}', b'{"model": "smollm2", "messages": "hi"}',
     b'{"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}'],
)
def test_malformed_body_is_400(stack, content):
    response = httpx.post(f"{stack['base_url']}/v1/chat/completions", content=content,
                          headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 400
    assert_openai_error(response.json(), 400)


def test_max_tokens_beyond_the_context_is_400_at_the_router(client):
    with pytest.raises(openai.BadRequestError, match="maximum context length is 2048 tokens") as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5000)
    assert err.value.body["param"] == "max_tokens"


def test_engine_side_validation_is_400(client):
    # vLLM's own parameters pass the router unchecked; vLLM's refusal still reaches the client as a 400.
    with pytest.raises(openai.BadRequestError, match="top_k"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, extra_body={"top_k": -5})


def test_prompt_longer_than_the_context_is_400_naming_the_limit(client):
    long = [{"role": "user", "content": "hello " * 3000}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=long, max_tokens=4)
    error = assert_openai_error(err.value.response.json(), 400)
    assert "maximum context length is 2048 tokens" in error["message"]
    # and the stack still serves afterwards
    assert client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2).choices


def test_a_client_leaving_mid_stream_stops_its_generation_in_vllm(stack):
    """vLLM's scheduler counts the requests it runs; clients that leave must drop out of it."""
    from raystack.config import deployment_name

    streams = 3
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    engine = EngineWatch(stack, deployment_name(MODEL, "vllm"))
    try:
        assert engine.running(0)["running"] == 0  # nothing left over from earlier tests
        with contextlib.ExitStack() as open_streams:
            for _ in range(streams):
                client = open_streams.enter_context(httpx.Client(timeout=300))
                response = open_streams.enter_context(
                    client.stream("POST", f"{stack['base_url']}/v1/chat/completions", json=body))
                assert response.status_code == 200
                lines = response.iter_lines()
                open_streams.callback(lines.close)  # kept open until the clients leave together
                assert next(line for line in lines if line.startswith("data: {"))
            assert engine.running(streams)["running"] == streams
        # The three clients have closed their connections, each far from its 2,000 tokens.
        assert engine.running(0, timeout_s=5)["running"] == 0
    finally:
        engine.close()


def test_vllms_own_figures_reach_prometheus_through_ray(stack, client):
    """The bridge from vLLM's engine stats: one more request, then the node's Prometheus endpoint."""

    port = session_port(stack, "metrics_export")
    labels = {"model": MODEL, "backend": "vllm"}
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, extra_body={"ignore_eos": True})
    deadline = time.monotonic() + 90
    while True:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        samples = parse_prometheus(text)
        if total(samples, "ray_raystack_e2e_request_latency_seconds_count", **labels) > 0 or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert total(samples, "ray_raystack_e2e_request_latency_seconds_count", **labels) > 0
    assert total(samples, "ray_raystack_time_to_first_token_seconds_count", **labels) > 0
    assert total(samples, "ray_raystack_generation_tokens_total", **labels) >= 8
    assert total(samples, "ray_raystack_prompt_tokens_total", **labels) > 0
