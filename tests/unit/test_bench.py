"""raystack bench's arithmetic and datasets: the definitions vllm bench serve uses, on known numbers."""

import asyncio
import json

import aiohttp
import pytest

from raystack.bench import datasets
from raystack.bench.loadgen import RequestResult, request_body, send
from raystack.bench.report import markdown, percentile, summarize


def test_percentile_interpolates_like_numpy():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10.0], 99) == 10.0
    assert percentile(list(range(101)), 99) == 99
    assert percentile([], 50) is None


def test_tpot_excludes_the_first_token_and_per_request_rate_uses_latency():
    r = RequestResult(ok=True, latency=2.0, ttft=0.5, itl=[0.5, 0.5, 0.5], output_tokens=4)
    assert r.tpot == pytest.approx(0.5)  # (2.0 - 0.5) / (4 - 1)
    assert r.tokens_per_s == pytest.approx(2.0)
    assert RequestResult(ok=True, latency=1.0, ttft=1.0, output_tokens=1).tpot is None


def test_summary_of_known_requests():
    ok = [RequestResult(ok=True, latency=1.0, ttft=0.2, itl=[0.1] * 8, output_tokens=9, input_tokens=5),
          RequestResult(ok=True, latency=2.0, ttft=0.4, itl=[0.2] * 8, output_tokens=9, input_tokens=5)]
    failed = RequestResult(ok=False, latency=0.1, error="HTTP 503: busy")
    row = summarize("m@vllm", 6, ok + [failed], duration_s=3.0)
    assert (row["completed"], row["failed"], row["total_output_tokens"]) == (2, 1, 18)
    assert row["output_throughput"] == pytest.approx(6.0)  # 18 tokens / 3 s
    assert row["ttft_median_ms"] == pytest.approx(300) and row["ttft_mean_ms"] == pytest.approx(300)
    assert row["tpot_median_ms"] == pytest.approx(150)  # 100 and 200
    assert row["itl_median_ms"] == pytest.approx(150)
    assert row["per_request_tokens_per_s"] == pytest.approx((9 + 4.5) / 2)
    assert row["errors"] == ["HTTP 503: busy"]
    table = markdown([row])
    assert "| m@vllm | 6 | 2 | 1 | 6.00 |" in table


def test_request_bodies_for_chat_and_completions():
    prompt = datasets.Prompt([{"role": "user", "content": "hi"}], max_tokens=8)
    chat = request_body("chat", "m", prompt, ignore_eos=True)
    assert chat["messages"] == prompt.messages and chat["max_tokens"] == 8 and chat["ignore_eos"] is True
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}
    completion = request_body("completions", "m", prompt, ignore_eos=False)
    assert completion["prompt"] == "hi" and "ignore_eos" not in completion


def test_random_prompts_have_the_asked_lengths_and_repeat_by_seed():
    prompts = datasets.random_prompts(20, input_len=100, output_len=10, range_ratio=0.5, seed=3)
    assert all(50 <= len(p.text.split()) <= 150 and 5 <= p.max_tokens <= 15 for p in prompts)
    assert prompts == datasets.random_prompts(20, input_len=100, output_len=10, range_ratio=0.5, seed=3)
    fixed = datasets.random_prompts(3, input_len=7, output_len=4)
    assert [len(p.text.split()) for p in fixed] == [7, 7, 7] and {p.max_tokens for p in fixed} == {4}
    with pytest.raises(datasets.DatasetError):
        datasets.random_prompts(1, 10, 10, range_ratio=1.5)


def test_fixed_prompt_is_the_puzzle_by_default():
    [prompt] = datasets.fixed_prompts(1, datasets.CHICKEN_AND_RABBIT, 256)
    assert "35 heads and 94 legs" in prompt.text and prompt.max_tokens == 256


def test_jsonl_prompts_take_both_shapes_and_say_what_is_wrong(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"prompt": "a"}) + "\n\n" +
                    json.dumps({"messages": [{"role": "user", "content": "b"}], "max_tokens": 3}) + "\n")
    prompts = datasets.jsonl_prompts(good, 5, output_len=9)
    assert len(prompts) == 5 and {p.text for p in prompts} == {"a", "b"}
    assert {p.max_tokens for p in prompts} == {9, 3}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt key"}\n')
    with pytest.raises(datasets.DatasetError, match=r"bad.jsonl:1: expected"):
        datasets.jsonl_prompts(bad, 1, None)
    with pytest.raises(datasets.DatasetError, match="no such file"):
        datasets.jsonl_prompts(tmp_path / "missing.jsonl", 1, None)


def _thinking_server(usage_counts_reasoning: bool, field: str):
    """A server streaming 3 chunks of thinking then 2 of answer, as vLLM (`reasoning`, no count in usage)
    or MindIE (`reasoning_content`, counted in usage) do."""
    from aiohttp import web

    async def chat(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        deltas = [{field: w} for w in ("Two", " and", " two.")] + [{"content": w} for w in ("Four", ".")]
        for delta in deltas:
            await asyncio.sleep(0.01)
            chunk = {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        usage = {"prompt_tokens": 4, "completion_tokens": 5,
                 "completion_tokens_details": {"reasoning_tokens": 3 if usage_counts_reasoning else 0}}
        await response.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


@pytest.mark.parametrize("usage_counts_reasoning, field", [(False, "reasoning"), (True, "reasoning_content")])
def test_thinking_is_counted_apart_and_the_answer_timed_after_it(usage_counts_reasoning, field):
    from aiohttp.test_utils import TestServer

    async def measure() -> RequestResult:
        async with TestServer(_thinking_server(usage_counts_reasoning, field)) as server, \
                aiohttp.ClientSession() as session:
            body = request_body("chat", "m", datasets.Prompt([{"role": "user", "content": "2+2?"}], max_tokens=5), False)
            return await send(session, str(server.make_url("/v1/chat/completions")), body, "chat", {})

    result = asyncio.run(measure())
    assert result.ok and (result.output_tokens, result.reasoning_tokens) == (5, 3)
    assert result.time_to_answer > result.ttft + 0.02  # three chunks of thinking came first
    row = summarize("m", 1, [result], duration_s=1.0)
    assert row["total_reasoning_tokens"] == 3 and row["reasoning_share"] == pytest.approx(0.6)
