"""What an answer cost, read as it goes out (raystack.router.metering.Meter)."""

from __future__ import annotations

import asyncio
import json

import pytest

from raystack.router.metering import Meter, ask_for_usage, estimate_prompt_tokens
from raystack.router.usage import Cost


def event(data) -> str:
    return f"data: {json.dumps(data)}\n\n"


CONTENT = [event({"choices": [{"index": 0, "delta": {"content": word}}]}) for word in ("a", "b", "c")]
USAGE = event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}})
DONE = "data: [DONE]\n\n"


def relayed(meter: Meter, chunks: list[str]) -> str:
    async def source():
        for chunk in chunks:
            yield chunk

    async def read():
        return "".join([c async for c in meter.watch(source())])

    return asyncio.run(read())


def test_the_usage_chunk_the_router_asked_for_is_counted_and_taken_out():
    body = {"stream": True, "messages": [{"role": "user", "content": "x" * 40}]}
    assert ask_for_usage(body) is False and body["stream_options"] == {"include_usage": True}
    meter = Meter(Cost(estimate_prompt_tokens(len(json.dumps(body)))), client_wants_usage=False)
    # Chunks as replicas coalesce them: the last content event, the usage and [DONE] in one.
    out = relayed(meter, [CONTENT[0], CONTENT[1], CONTENT[2] + USAGE + DONE])
    assert out == "".join(CONTENT) + DONE
    assert (meter.cost.prompt_tokens, meter.cost.completion_tokens, meter.cost.settled) == (7, 3, True)


def test_a_client_that_asked_for_usage_gets_it():
    body = {"stream": True, "stream_options": {"include_usage": True}}
    assert ask_for_usage(body) is True
    meter = Meter(Cost(5), client_wants_usage=True)
    assert relayed(meter, [*CONTENT, USAGE, DONE]) == "".join(CONTENT) + USAGE + DONE
    assert meter.cost.tokens == 10


def test_a_stream_cut_before_its_usage_counts_the_events_relayed_and_the_estimate():
    meter = Meter(Cost(12), client_wants_usage=False)
    relayed(meter, [CONTENT[0], CONTENT[1] + CONTENT[2]])
    assert (meter.cost.prompt_tokens, meter.cost.completion_tokens, meter.cost.settled) == (12, 3, False)


def test_an_error_event_marks_the_answer_failed_and_a_whole_answer_reads_its_usage():
    meter = Meter(Cost(4))
    relayed(meter, [CONTENT[0], event({"error": {"message": "broke", "code": 502}}), DONE])
    assert meter.cost.error and meter.cost.completion_tokens == 1

    whole = Meter(Cost(4))
    whole.whole(200, {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}})
    assert (whole.cost.tokens, whole.cost.error) == (11, False)
    refused = Meter(Cost(4))
    refused.whole(400, {"error": {"message": "bad"}})
    assert refused.cost.error and refused.cost.tokens == 0  # refused: nothing generated, nothing counted


def test_the_prompt_estimate_is_about_four_characters_a_token():
    assert estimate_prompt_tokens(400) == 101
    assert 90 < estimate_prompt_tokens(len(json.dumps({"messages": [{"role": "user", "content": "y" * 360}]}))) < 120


def test_usage_report_arguments_and_table():
    from raystack.router.usage import render, since_seconds

    assert (since_seconds("30m"), since_seconds("12h"), since_seconds("7d")) == (1800, 43200, 604800)
    for bad in ("1w", "d", "0h", "-1d"):
        with pytest.raises(ValueError, match="--since takes"):
            since_seconds(bad)
    table = render([{"app": "keys", "key": "team-a", "model": "qwen3", "class": "batch", "requests": 3, "prompt_tokens": 120,
                     "completion_tokens": 900, "errors": 1}], "1d").splitlines()
    assert table[0].split() == ["APP", "KEY", "MODEL", "CLASS", "REQUESTS", "PROMPT", "TOKENS", "COMPLETION", "TOKENS",
                                "ERRORS"]
    assert table[1].split() == ["keys", "team-a", "qwen3", "batch", "3", "120", "900", "1"]
    assert "No usage recorded in the last 1d" in render([], "1d")
