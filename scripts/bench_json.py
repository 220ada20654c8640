#!/usr/bin/env python3
"""Micro-benchmark of the JSON the serving path reads and writes: the stdlib's json against msgspec's, on the
bodies and events the path handles, made by raystack's own code (a short chat body as scripts/bench_router.py
sends it, the synthetic engine's 4-token whole answer, one of its SSE events, its usage event), and the path's
own functions as they are now (protocol.parse_request, protocol.sse_event, json_codec.JSONAnswer against
Starlette's JSONResponse). Best of 5 timeit runs, in microseconds per call.

    .venv/bin/python scripts/bench_json.py [--number 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import timeit
from pathlib import Path

import msgspec
from starlette.responses import JSONResponse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raystack.config import Backend  # noqa: E402
from raystack.engines.base import create_engine  # noqa: E402
from raystack.json_codec import JSONAnswer  # noqa: E402
from raystack.protocol import parse_request, sse_event  # noqa: E402

BODY = json.dumps({"model": "synthetic", "messages": [{"role": "user", "content": "benchmark me"}],
                   "max_tokens": 4, "stream": False}).encode()


async def answers() -> tuple[dict, list[str]]:
    backend = Backend(name="synthetic", engine="synthetic", synthetic={"ttft_ms": 0, "tokens_per_s": 0})
    engine = create_engine("synthetic", None, backend)
    whole = (await engine.generate("chat", json.loads(BODY))).body
    stream = (await engine.generate("chat", {**json.loads(BODY), "stream": True,
                                             "stream_options": {"include_usage": True}})).stream
    return whole, [event async for event in stream]


def refuse(name: str) -> None:
    raise ValueError(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--number", type=int, default=100_000, help="calls per timeit run")
    number = parser.parse_args().number
    whole, events = asyncio.run(answers())
    chunk, usage = events[1], events[-2]
    chunk_value = json.loads(chunk[6:])
    decoder, encoder = msgspec.json.Decoder(), msgspec.json.Encoder()
    cases = [
        ("short chat body, decode", len(BODY),
         lambda: json.loads(BODY, parse_constant=refuse), lambda: decoder.decode(BODY)),
        ("4-token whole answer, encode", len(json.dumps(whole)),
         lambda: json.dumps(whole, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(),
         lambda: encoder.encode(whole)),
        ("SSE event, encode", len(chunk),
         lambda: json.dumps(chunk_value, separators=(",", ":")), lambda: encoder.encode(chunk_value).decode()),
        ("SSE event, decode", len(chunk), lambda: json.loads(chunk[6:]), lambda: decoder.decode(chunk[6:])),
        ("usage event, decode", len(usage), lambda: json.loads(usage[6:]), lambda: decoder.decode(usage[6:])),
    ]

    def best(call) -> float:
        return min(timeit.repeat(call, number=number, repeat=5)) / number * 1e6

    print(f"{'what':32s} {'bytes':>6s} {'json us':>8s} {'msgspec us':>10s} {'x':>5s}")
    for name, size, stdlib, fast in cases:
        slow_us, fast_us = best(stdlib), best(fast)
        print(f"{name:32s} {size:6d} {slow_us:8.3f} {fast_us:10.3f} {slow_us / fast_us:5.1f}")
    print("\nthe path's functions as they are:")
    for name, call in [("parse_request(short chat body)", lambda: parse_request("chat", BODY)),
                       ("sse_event(SSE event)", lambda: sse_event(chunk_value)),
                       ("JSONResponse(whole answer)", lambda: JSONResponse(whole)),
                       ("JSONAnswer(whole answer)", lambda: JSONAnswer(whole))]:
        print(f"{name:32s} {best(call):8.3f} us")


if __name__ == "__main__":
    main()
