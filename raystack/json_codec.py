"""JSON on the serving path, in one place: request bodies, whole answers and SSE events, in the router and in
the replica. msgspec (a dependency of raystack, and of vLLM) reads and writes these 4-12x faster than the
stdlib's json (scripts/bench_json.py). What msgspec refuses goes to the stdlib, as before msgspec: so what is
accepted, the values read, and the error that says why not (a 400's message) stay the stdlib's.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import msgspec
from starlette.responses import JSONResponse

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def decode(data: bytes | str, parse_constant: Callable[[str], Any] | None = None) -> Any:
    """`data` as json.loads(data, parse_constant=parse_constant) reads it. msgspec takes strict JSON in UTF-8,
    where both read the same values; the rest (a UTF-16 body or one with a BOM, NaN, an escaped lone surrogate,
    1e400, nesting past its depth) is the stdlib's to read or to refuse with its own error (ValueError,
    UnicodeDecodeError, RecursionError)."""
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return json.loads(data, parse_constant=parse_constant)


def encode(value: Any) -> bytes:
    """`value` as compact JSON in UTF-8. Non-ASCII text is written as it is (the stdlib escaped it; both
    are JSON); NaN and infinities are written null (the stdlib wrote NaN, which JSON has not). What msgspec
    cannot write (a lone surrogate, a key that is not a string or a number) the stdlib writes, escaped, or
    refuses (TypeError)."""
    try:
        return _encoder.encode(value)
    except (TypeError, UnicodeEncodeError):
        return json.dumps(value, separators=(",", ":")).encode()


class JSONAnswer(JSONResponse):
    """A JSON response written by `encode` (Starlette's JSONResponse writes with the stdlib)."""

    def render(self, content: Any) -> bytes:
        return encode(content)
