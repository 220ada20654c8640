"""Structured output and tool calls on the embedded default, through the router, with the openai client: what
apps and agents send. vLLM constrains the answer to the schema (its structured-output backend; for tools, the
hermes parser's structural tag at local.yaml's tool_strict_level: parameter), so even a 135M model answers in
shape; streamed deltas must reassemble into the whole answer (greedy: the same tokens). Tools and schemas
no engine could use are refused at the router."""

import json

import jsonschema
import openai
import pytest

MODEL = "smollm2"
ASK = [{"role": "user", "content": "What is the weather in Paris? Answer in celsius."}]
WEATHER_ARGS = {  # enums keep a tiny model's answer short and checkable
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER_ARGS}}]
GREEDY = {"temperature": 0, "max_tokens": 64}
# A call is ~30 tokens, but the grammar lets a small model spend some on whitespace between JSON tokens.
CALL_ROOM = {"temperature": 0, "max_tokens": 200}


def test_a_json_schema_response_parses_and_validates_whole_and_streamed(client):
    response_format = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER_ARGS}}
    whole = client.chat.completions.create(model=MODEL, messages=ASK, response_format=response_format, **GREEDY)
    answer = json.loads(whole.choices[0].message.content)
    jsonschema.validate(answer, WEATHER_ARGS)
    stream = client.chat.completions.create(model=MODEL, messages=ASK, response_format=response_format, stream=True,
                                            **GREEDY)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert json.loads(text) == answer


def test_a_json_object_response_is_a_json_object(client):
    whole = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Reply with a JSON object with one key, ok, set to true."}],
        response_format={"type": "json_object"}, temperature=0, max_tokens=128,
    )
    assert whole.choices[0].finish_reason == "stop", whole.choices[0].message.content
    assert isinstance(json.loads(whole.choices[0].message.content), dict)


def streamed_tool_calls(client: openai.OpenAI, **request) -> tuple[dict[int, dict[str, str]], str | None]:
    """A stream's tool calls, index -> {id, name, arguments} reassembled from its deltas, and its finish_reason."""
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **request):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for part in choice.delta.tool_calls or []:
                call = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += part.id or ""
                call["name"] += part.function.name or "" if part.function else ""
                call["arguments"] += part.function.arguments or "" if part.function else ""
    return calls, finish


@pytest.mark.parametrize("tool_choice, strict", [
    ({"type": "function", "function": {"name": "get_weather"}}, False),  # bound by tool_strict_level: parameter
    ("required", True),  # bound by the tool's own strict
], ids=["named", "required-strict"])
def test_tool_choice_returns_a_call_whose_arguments_match_the_schema_whole_and_streamed(client, tool_choice, strict):
    tools = [{"type": "function", "function": {**TOOLS[0]["function"], "strict": strict}}]
    request = {"messages": ASK, "tools": tools, "tool_choice": tool_choice, **CALL_ROOM}
    whole = client.chat.completions.create(model=MODEL, **request)
    [call] = whole.choices[0].message.tool_calls
    assert (call.type, call.function.name) == ("function", "get_weather") and call.id
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER_ARGS)
    calls, finish = streamed_tool_calls(client, **request)
    [streamed] = calls.values()
    assert streamed["name"] == "get_weather" and streamed["id"]
    assert json.loads(streamed["arguments"]) == arguments
    assert finish == whole.choices[0].finish_reason


def test_an_agent_turn_sends_the_tool_result_back_and_gets_an_answer(client):
    # tool_choice auto: the model sees the tools (the prepared template lists them) and decides
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, **GREEDY)
    assert first.choices[0].message.content or first.choices[0].message.tool_calls
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}
    turns = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
             {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temperature": 21})}]
    answer = client.chat.completions.create(model=MODEL, messages=turns, tools=TOOLS, tool_choice="none", **GREEDY)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


@pytest.mark.parametrize("request_fields, param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_stock"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "no-such-type"}}}],
      "tool_choice": "required"}, "tools"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": 7}}}},
     "response_format"),
])
def test_a_tool_or_schema_that_cannot_work_is_a_400_and_the_replica_keeps_serving(client, request_fields, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=ASK, **GREEDY, **request_fields)
    assert err.value.status_code == 400
    assert param in str(err.value.body)
    assert client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2).choices
