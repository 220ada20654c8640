"""Reasoning on the real vLLM engine, through the router: the embedded stack with a reasoning parser on
(conftest.py: the second stack).

SmolLM2 does not think on its own and has no <think> tokens, so vLLM's qwen3 and deepseek_r1 parsers cannot
load on it; the olmo3 parser reads the tags as text. The requests make SmolLM2 think in that shape with a
regex (vLLM's structured outputs, applied from the first token: enable_in_reasoning), and its thinking must
come back apart from its answer. (olmo3's stream starts in its reasoning state, which is why local.yaml
itself has no reasoning parser: a model that never thinks would stream its answers as reasoning. Few-shot
examples do not do here: a `</think>` in the prompt tells vLLM's stream that the thinking has ended.)"""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest

from raystack.bench.datasets import Prompt
from raystack.bench.loadgen import request_body, send
from tests.e2e_options.conftest import MODEL

pytestmark = pytest.mark.e2e

THINK_FIRST = [{"role": "user", "content": "What is 3 + 5? Think first, then answer."}]
SHAPED = {"temperature": 0, "max_tokens": 60,
          "structured_outputs": {"regex": r"<think>[A-Za-z0-9 ,+=]{8,60}\.</think>[A-Za-z0-9 ,+=]{4,40}\."}}


def test_the_thinking_comes_back_apart_whole_and_streamed_under_both_names(options_stack):
    client = openai.OpenAI(base_url=f"{options_stack}/v1", api_key="unused", max_retries=0, timeout=300)
    whole = client.chat.completions.create(model=MODEL, messages=THINK_FIRST, extra_body=SHAPED)
    message = whole.choices[0].message
    reasoning = message.model_extra["reasoning"]  # vLLM's name
    assert reasoning and message.model_extra["reasoning_content"] == reasoning  # MindIE's and DeepSeek's, added
    assert message.content and "think>" not in message.content + reasoning
    deltas = [chunk.choices[0].delta for chunk in client.chat.completions.create(
        model=MODEL, messages=THINK_FIRST, stream=True, extra_body=SHAPED) if chunk.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == reasoning
    assert "".join(d.content or "" for d in deltas) == message.content


def test_bench_counts_the_thinking_apart_and_times_the_answer_after_it(options_stack):
    async def one():
        async with aiohttp.ClientSession() as session:
            body = request_body("chat", MODEL, Prompt(THINK_FIRST, SHAPED["max_tokens"]), ignore_eos=False) | SHAPED
            return await send(session, f"{options_stack}/v1/chat/completions", body, "chat", {})

    result = asyncio.run(one())
    assert result.ok, result.error
    assert 0 < result.reasoning_tokens < result.output_tokens
    assert result.time_to_answer > result.ttft
