"""engine: synthetic, driven directly with asyncio (no Ray): OpenAI shapes, determinism, usage, limits,
pace (lower bounds only: behaviour, not performance) and the accounting of cancelled requests."""

import asyncio
import json

import pytest

from raystack.config import Backend
from raystack.engines.base import Answer, create_engine, engine_spec
from raystack.engines.synthetic import SyntheticEngine
from raystack.replica.server import coalesce

FAST = {"ttft_ms": 0, "tokens_per_s": 0}
CHAT = {"model": "synthetic", "messages": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "What is the capital of France?"}]}
PROMPT = {"model": "synthetic", "prompt": "The capital of France is"}


def engine(max_model_len=None, **synthetic) -> SyntheticEngine:
    backend = Backend(name="synthetic", engine="synthetic", max_model_len=max_model_len,
                      synthetic={**FAST, **synthetic})
    return create_engine("synthetic", None, backend)


def run(coro):
    return asyncio.run(coro)


async def answer(eng, kind, body) -> Answer:
    result = await eng.generate(kind, body)
    assert result.stream is None
    return result


async def events(eng, kind, body) -> list:
    """The stream's events: parsed JSON chunks, then the literal "[DONE]"."""
    stream = (await eng.generate(kind, {**body, "stream": True})).stream
    out = []
    async for event in stream:
        assert event.startswith("data: ") and event.endswith("\n\n")
        data = event[len("data: "):-2]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def chat_text(chunks) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


def test_engine_is_registered_and_needs_no_model():
    assert engine_spec("synthetic").engine_type() is SyntheticEngine and not engine_spec("synthetic").loads_model
    assert isinstance(engine(), SyntheticEngine)


def test_chat_answer_has_openai_shape_and_word_usage():
    reply = run(answer(engine(), "chat", {**CHAT, "max_tokens": 5})).body
    assert reply["id"].startswith("chatcmpl-") and reply["object"] == "chat.completion"
    assert reply["model"] == "synthetic" and isinstance(reply["created"], int)
    [choice] = reply["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split()) == 5
    # prompt tokens: the words of every message's content
    assert reply["usage"] == {"prompt_tokens": 2 + 6, "completion_tokens": 5, "total_tokens": 13}


def test_completion_answer_has_openai_shape():
    reply = run(answer(engine(), "completion", {**PROMPT, "max_tokens": 4})).body
    assert reply["id"].startswith("cmpl-") and reply["object"] == "text_completion"
    [choice] = reply["choices"]
    assert len(choice["text"].split()) == 4 and choice["finish_reason"] == "length"
    assert reply["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}


def test_same_request_same_text_and_the_prompt_seeds_it():
    eng = engine()
    first = run(answer(eng, "completion", {**PROMPT, "max_tokens": 8})).body["choices"][0]["text"]
    again = run(answer(eng, "completion", {**PROMPT, "max_tokens": 8})).body["choices"][0]["text"]
    other = run(answer(eng, "completion", {**PROMPT, "prompt": "Hello", "max_tokens": 8})).body["choices"][0]["text"]
    assert first == again and first != other
    assert run(answer(engine(), "completion", {**PROMPT, "max_tokens": 8})).body["choices"][0]["text"] == first


def test_length_is_max_tokens_else_the_configured_default():
    eng = engine(output_tokens=7)
    default = run(answer(eng, "chat", CHAT)).body
    assert default["usage"]["completion_tokens"] == 7 and default["choices"][0]["finish_reason"] == "stop"
    newer = run(answer(eng, "chat", {**CHAT, "max_completion_tokens": 3, "ignore_eos": True})).body
    assert newer["usage"]["completion_tokens"] == 3


def test_content_parts_and_token_id_prompts_count_as_tokens():
    parts = {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "one two"},
                                                               {"type": "text", "text": "three"}]}]}
    assert run(answer(engine(), "chat", parts)).body["usage"]["prompt_tokens"] == 3
    ids = {**PROMPT, "prompt": [101, 102, 103, 104]}
    assert run(answer(engine(), "completion", ids)).body["usage"]["prompt_tokens"] == 4


def test_chat_stream_matches_the_whole_answer_and_ends_with_usage_then_done():
    eng = engine()
    whole = run(answer(eng, "chat", {**CHAT, "max_tokens": 6})).body
    chunks = run(events(eng, "chat", {**CHAT, "max_tokens": 6, "stream_options": {"include_usage": True}}))
    assert chunks[-1] == "[DONE]"
    usage_chunk, tokens = chunks[-2], chunks[:-2]
    assert len(tokens) == 6, "one chunk per token"
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == tokens[0]["id"] for c in tokens)
    assert tokens[0]["id"].startswith("chatcmpl-")
    assert tokens[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chat_text(tokens) == whole["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in tokens] == [None] * 5 + ["length"]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]


def test_stream_without_include_usage_has_no_usage_chunk():
    chunks = run(events(engine(), "completion", {**PROMPT, "max_tokens": 3}))
    assert chunks[-1] == "[DONE]" and len(chunks) == 4
    assert all(c["choices"] and "usage" not in c for c in chunks[:-1])
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == run(
        answer(engine(), "completion", {**PROMPT, "max_tokens": 3})).body["choices"][0]["text"]


def test_request_beyond_max_model_len_is_400_naming_the_limit():
    result = run(engine(max_model_len=16).generate("completion", {**PROMPT, "max_tokens": 12}))
    assert result.status == 400
    error = result.body["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "prompt"
    assert "maximum context length is 16 tokens" in error["message"] and "17 tokens" in error["message"]
    no_room = run(engine(max_model_len=16).generate("completion", {**PROMPT, "prompt": "word " * 16}))
    assert no_room.status == 400 and "17 tokens (16 in the prompt, 1 in the completion)" in no_room.body["error"]["message"]


def test_without_max_tokens_the_answer_fills_only_the_rest_of_the_context():
    reply = run(answer(engine(max_model_len=16, output_tokens=64), "completion", PROMPT)).body
    assert reply["usage"]["total_tokens"] == 16 and reply["choices"][0]["finish_reason"] == "length"


def test_only_one_choice_and_one_prompt_per_request():
    result = run(engine().generate("chat", {**CHAT, "n": 2}))
    assert result.status == 400 and result.body["error"]["param"] == "n"
    assert "n=1" in result.body["error"]["message"]
    result = run(engine().generate("completion", {**PROMPT, "prompt": ["a", "b"]}))
    assert result.status == 400 and result.body["error"]["param"] == "prompt"


def test_first_token_waits_for_ttft():
    async def first_chunk_after():
        loop = asyncio.get_running_loop()
        start = loop.time()
        stream = (await engine(ttft_ms=200, tokens_per_s=None).generate("chat", {**CHAT, "stream": True})).stream
        await stream.__anext__()
        elapsed = loop.time() - start
        await stream.aclose()
        return elapsed

    assert run(first_chunk_after()) >= 0.15


def test_tokens_follow_the_rate_streaming_or_not():
    async def duration(stream):
        loop = asyncio.get_running_loop()
        start = loop.time()
        result = await engine(ttft_ms=0, tokens_per_s=20).generate("completion", {**PROMPT, "max_tokens": 5,
                                                                                   "stream": stream})
        if stream:
            async for _ in result.stream:
                pass
        return loop.time() - start

    # 5 tokens at 20/s: the last is due 4 x 50 ms after the first
    assert run(duration(True)) >= 0.15
    assert run(duration(False)) >= 0.15


def test_unpaced_streams_still_take_turns_on_the_event_loop():
    async def interleaving():
        eng = engine(tokens_per_s=0)
        order = []

        async def consume(tag):
            async for _ in (await eng.generate("completion", {**PROMPT, "max_tokens": 50, "stream": True})).stream:
                order.append(tag)

        await asyncio.gather(consume("a"), consume("b"))
        return order

    order = run(interleaving())
    switches = sum(1 for x, y in zip(order, order[1:]) if x != y)
    assert switches > 10, "each token yields to the loop, so concurrent streams interleave"


def test_running_counts_requests_in_flight():
    async def scenario():
        eng = engine(ttft_ms=0, tokens_per_s=20)  # each request lasts 450 ms
        body = {**PROMPT, "max_tokens": 10, "stream": True}

        async def consume():
            async for _ in (await eng.generate("completion", body)).stream:
                pass

        tasks = [asyncio.create_task(consume()) for _ in range(3)]
        tasks.append(asyncio.create_task(eng.generate("completion", {**body, "stream": False})))
        await asyncio.sleep(0.05)
        during = eng.stats()
        await asyncio.gather(*tasks)
        return during, eng.stats()

    during, after = run(scenario())
    assert during == {"running": 4, "waiting": 0, "completed": 0, "cancelled": 0}
    assert after == {"running": 0, "waiting": 0, "completed": 4, "cancelled": 0}


def test_a_consumer_that_stops_iterating_ends_the_request_as_cancelled():
    async def scenario():
        eng = engine(ttft_ms=0, tokens_per_s=10)
        stream = (await eng.generate("chat", {**CHAT, "max_tokens": 100, "stream": True})).stream
        await stream.__anext__()
        assert eng.stats()["running"] == 1
        await stream.aclose()
        return eng.stats()

    assert run(scenario()) == {"running": 0, "waiting": 0, "completed": 0, "cancelled": 1}


def test_a_cancelled_task_stops_at_once_streaming_or_not():
    async def scenario(stream):
        eng = engine(ttft_ms=0, tokens_per_s=1)  # 100 tokens would take 99 s

        async def consume():
            result = await eng.generate("chat", {**CHAT, "max_tokens": 100, "stream": stream})
            if stream:
                async for _ in result.stream:
                    pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        assert eng.stats()["running"] == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 1)
        return eng.stats()

    for stream in (True, False):
        assert run(scenario(stream)) == {"running": 0, "waiting": 0, "completed": 0, "cancelled": 1}


def test_leaving_the_llmserver_stream_early_cancels_the_engine_request():
    # LLMServer relays engine streams through coalesce(); a client disconnect closes that relay.
    async def scenario():
        eng = engine(ttft_ms=0, tokens_per_s=50)
        relay = coalesce((await eng.generate("completion", {**PROMPT, "max_tokens": 100, "stream": True})).stream)
        await relay.__anext__()
        await relay.aclose()
        await asyncio.sleep(0.01)  # the pump task handles its cancellation
        return eng.stats()

    assert run(scenario()) == {"running": 0, "waiting": 0, "completed": 0, "cancelled": 1}
