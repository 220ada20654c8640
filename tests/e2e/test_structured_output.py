"""Structured output on the embedded default, through the router, with the openai client: what apps send.
vLLM constrains the answer to the schema (its structured-output backend), so even a 135M model answers in
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
