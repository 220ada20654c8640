"""The serving path's JSON (raystack.json_codec): msgspec where it reads and writes as the stdlib would, the
stdlib for the rest, so what a body may be and what a 400 says did not change with it."""

import json
import math

import pytest

from raystack.json_codec import JSONAnswer, decode, encode
from raystack.protocol import OpenAIError, parse_request, sse_event

CHAT = {"model": "m", "messages": [{"role": "user", "content": "héllo 😀"}]}


@pytest.mark.parametrize("raw", [
    json.dumps(CHAT).encode(),
    json.dumps(CHAT, ensure_ascii=False).encode(),
    json.dumps(CHAT).encode("utf-16"),  # what msgspec refuses, read by the stdlib as before
    json.dumps(CHAT).encode("utf-32"),
    b"\xef\xbb\xbf" + json.dumps(CHAT).encode(),  # a UTF-8 BOM
    b'{"a": "\\ud800", "b": 1e400, "c": 123456789012345678901234567890, "a": 2}',  # lone surrogate, dup key
    b'[1.7976931348623157e308, 4.9e-324, -0.0, 0.1, 1E5]',
    b"  {} \r\n",
])
def test_decode_reads_what_the_stdlib_reads(raw):
    expected = json.loads(raw)
    assert repr(decode(raw)) == repr(expected)  # repr: -0.0 and NaN compare as they are written


@pytest.mark.parametrize("raw", [b"", b"{not json", b'{"a": 1} x', b'{"a": "x\x01"}', b"\xff\xfe\xff", b"[" * 100_000])
def test_decode_refuses_with_the_stdlibs_error(raw):
    try:
        json.loads(raw)
    except (ValueError, RecursionError) as err:
        expected = err
    with pytest.raises(type(expected)) as err:
        decode(raw)
    assert str(err.value) == str(expected)


def test_a_bad_body_is_a_400_saying_what_the_stdlib_said():
    with pytest.raises(OpenAIError) as err:
        parse_request("chat", b'{"model": "m",')
    assert err.value.status == 400
    assert err.value.message == ("The request body is not valid JSON: Expecting property name enclosed in double "
                                 "quotes: line 1 column 15 (char 14). Send a JSON object.")
    for constant in (b"NaN", b"Infinity", b"-Infinity"):  # msgspec refuses them, and so does parse_request
        with pytest.raises(OpenAIError) as err:
            parse_request("chat", b'{"model": "m", "messages": [], "temperature": ' + constant + b"}")
        assert err.value.message.startswith(f"The request body is not valid JSON: {constant.decode()} is not JSON")


def test_encode_writes_json_the_stdlib_reads_back_alike():
    value = {"id": "x", "choices": [{"delta": {"content": "ü 😀\u2028"}, "logprob": -0.25}], "n": 10**30, "k": None}
    assert json.loads(encode(value)) == value
    assert encode(value).decode().isascii() is False  # UTF-8 as it is, not escaped
    assert json.loads(encode({"s": "\ud800"}).decode()) == {"s": "\ud800"}  # written by the stdlib, escaped
    assert json.loads(encode({None: 1, 2: "two"})) == {"null": 1, "2": "two"}
    assert json.loads(encode({"x": math.nan, "y": -math.inf})) == {"x": None, "y": None}
    with pytest.raises(TypeError):
        encode({"x": object()})


def test_sse_events_and_whole_answers_are_compact_json():
    assert sse_event({"a": [1, {"b": "é"}]}) == 'data: {"a":[1,{"b":"é"}]}\n\n'
    answer = JSONAnswer({"usage": {"prompt_tokens": 3}}, status_code=201, headers={"x-raystack-backend": "b"})
    assert answer.body == b'{"usage":{"prompt_tokens":3}}' and answer.status_code == 201
    assert answer.headers["content-type"] == "application/json" and answer.headers["x-raystack-backend"] == "b"
    assert answer.headers["content-length"] == str(len(answer.body))
