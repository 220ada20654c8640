"""Router-side request checks: malformed requests become 400s in OpenAI's error shape."""

import asyncio
import json

import pytest

from raystack.protocol import OpenAIError, error_body, parse_request, sse_event, stream_reasoning_both_ways

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def body(**changes):
    return json.dumps({**CHAT, **changes}).encode()


@pytest.mark.parametrize(
    "raw, param",
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b"\xff\xfe", None),
        (body(messages=[]), "messages"),
        (body(messages="hi"), "messages"),
        (body(messages=[{"role": "wizard", "content": "x"}]), "messages.0.role"),
        (body(model=""), "model"),
        (body(model=3), "model"),
        (body(temperature=5), "temperature"),
        (body(top_p=0), "top_p"),
        (body(n=0), "n"),
        (body(max_tokens=0), "max_tokens"),
        (body(stop=[1, 2]), "stop"),
        (body(stream="yes please"), "stream"),
        (body(max_tokens="5"), "max_tokens"),  # strict: a string never reaches an engine as a length
        (body(max_tokens=2**40), "max_tokens"),
        (body(n=1.5), "n"),
        (body(presence_penalty=3), "presence_penalty"),
        (body(messages=[{"role": "user", "content": [{"text": "no type"}]}]), "messages.0.content"),
        (body(temperature=True), "temperature"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', None),
        (b"[" * 100_000, None),  # deeper than the JSON reader recurses
    ],
)
def test_malformed_chat_requests_are_400_with_the_param(raw, param):
    with pytest.raises(OpenAIError) as err:
        parse_request("chat", raw)
    assert err.value.status == 400
    assert err.value.param == param or (param and err.value.param.startswith(param))
    shape = err.value.body()["error"]
    assert shape["type"] == "invalid_request_error" and shape["message"]


def test_engine_specific_fields_pass_through_untouched():
    parsed = parse_request("chat", body(ignore_eos=True, top_k=5, stream_options={"include_usage": True},
                                        my_engine_knob={"a": [1]}))
    assert parsed["ignore_eos"] is True and parsed["top_k"] == 5 and parsed["my_engine_knob"] == {"a": [1]}


@pytest.mark.parametrize("kind, field, value", [
    # Once 500s: the synthetic engine took a completion's max_completion_tokens as a count.
    ("completion", "max_completion_tokens", 0.5),
    ("completion", "max_completion_tokens", [4]),
    ("chat", "top_k", "5"), ("chat", "min_tokens", -1), ("chat", "stop_token_ids", [-1]),
    ("chat", "logit_bias", {"1": 500}), ("chat", "tools", [{"type": "function"}]),
    ("chat", "tool_choice", "sometimes"), ("chat", "response_format", {"type": 1}),
    ("completion", "best_of", 0), ("completion", "suffix", 3), ("completion", "echo", "yes"),
])
def test_engine_fields_are_typed_on_both_endpoints(kind, field, value):
    valid = {"chat": CHAT, "completion": {"model": "m", "prompt": "hi"}}[kind]
    with pytest.raises(OpenAIError) as err:
        parse_request(kind, json.dumps({**valid, field: value}).encode())
    assert err.value.status == 400 and err.value.param.split(".")[0] == field


def test_a_field_of_several_shapes_is_named_with_the_shapes_it_takes():
    with pytest.raises(OpenAIError) as err:
        parse_request("completion", json.dumps({"model": "m", "prompt": [1, -2]}).encode())
    assert err.value.param == "prompt"
    assert "a list of token ids (integers from 0)" in err.value.message
    with pytest.raises(OpenAIError) as err:
        parse_request("chat", body(stop=[1]))
    assert err.value.message == "Invalid value for 'stop': expected a string or a list of strings."


def test_completion_prompt_shapes():
    for prompt in ["text", ["a", "b"], [1, 2, 3], [[1, 2], [3]]]:
        assert parse_request("completion", json.dumps({"model": "m", "prompt": prompt}).encode())["prompt"] == prompt
    with pytest.raises(OpenAIError):
        parse_request("completion", json.dumps({"model": "m"}).encode())


def test_error_body_is_openai_shaped():
    assert error_body(404, "no such model", "model", "model_not_found") == {
        "error": {"message": "no such model", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    }
    assert error_body(503, "later")["error"]["type"] == "service_unavailable"


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.mark.parametrize(
    "changes, param, says",
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_stock"}}},
         "tool_choice", "names the function `get_stock`, which is not in `tools` (get_weather)"),
        ({"tool_choice": "required"}, "tool_choice", "no tools are given"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "no-such-type"}}}]},
         "tools.0.function.parameters", "is not a valid JSON Schema"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"required": "city"}}}]},
         "tools.0.function.parameters", "is not a valid JSON Schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": 7}}}},
         "response_format.json_schema.schema", "is not a valid JSON Schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "w"}}},
         "response_format.json_schema.schema", "needs `json_schema.schema`"),
    ],
)
def test_a_tool_or_schema_no_engine_could_use_is_a_400_naming_it(changes, param, says):
    with pytest.raises(OpenAIError) as err:
        parse_request("chat", body(**changes))
    assert (err.value.status, err.value.param) == (400, param)
    assert says in err.value.message


@pytest.mark.parametrize("value", ["get_weather", 5, [{"role": "user", "content": "hi"}], [WEATHER]])
def test_tools_on_completions_of_any_value_is_a_400_naming_the_field(value):
    # Once 500s (9 in 1,000 fuzzed requests): completions took `tools` through as an extra field, unchecked.
    for field in ("tools", "tool_choice"):
        with pytest.raises(OpenAIError) as err:
            parse_request("completion", json.dumps({"model": "m", "prompt": "hi", field: value}).encode())
        assert (err.value.status, err.value.param) == (400, field) and "/v1/chat/completions" in err.value.message


@pytest.mark.parametrize("value", ["get_weather", 5, [{"role": "user", "content": "hi"}], {"type": "function"}])
def test_a_bad_tools_value_on_chat_is_a_400_naming_the_field(value):
    with pytest.raises(OpenAIError) as err:
        parse_request("chat", body(tools=value))
    assert err.value.status == 400 and err.value.param.split(".")[0] == "tools"


def test_tools_and_schemas_that_work_pass_untouched():
    changes = {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
               "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER[
                   "function"]["parameters"]}}}
    assert parse_request("chat", body(**changes)) == {**CHAT, **changes}
    assert parse_request("chat", body(tools=[WEATHER], tool_choice="none"))["tool_choice"] == "none"


def test_streamed_reasoning_carries_both_names_and_other_chunks_pass_untouched():
    # vLLM streams `reasoning`; clients of MindIE and DeepSeek read `reasoning_content`
    events = [sse_event({"choices": [{"index": 0, "delta": {"role": "assistant", "reasoning": "Two and two"}}]}),
              sse_event({"choices": [{"index": 0, "delta": {"content": "Four", "reasoning": None}}]}),
              "data: [DONE]\n\n"]

    async def relay() -> list[str]:
        async def upstream():
            for event in events:
                yield event
        return [event async for event in stream_reasoning_both_ways(upstream())]

    thinking, answer, done = asyncio.run(relay())
    delta = json.loads(thinking[6:])["choices"][0]["delta"]
    assert delta["reasoning"] == delta["reasoning_content"] == "Two and two"
    assert (answer, done) == (events[1], events[2])
