"""How often a request's body and its answer are read and written on their whole path, through the code of
both processes, counted with cProfile (nothing replaced): the router's (the body's checks, the prefix route,
a key's meter, the relay) and the replica's (LLMServer.generate with the synthetic engine, the one the
benchmarks run). Every pass is pinned: a second parse, validation or serialisation added back fails here.

Per request:
  router    the body decoded once and validated once (raystack's models), its prompt text made once and only
            for prefix_affinity; nothing serialised for the key's estimate.
  replica   the synthetic engine reads the body as the router parsed it: nothing decoded, nothing validated;
            each event serialised once; the opening checked once for an engine failure, parsed only when it
            is an error event.
  router    a whole answer serialised once; of a stream, only the event that carries usage is parsed (an
            error event is known by its first key, a content event beside the usage one is only counted).
vLLM's replica validates the body once more, into vLLM's own request object: that pass is the engine's
(README, "Architecture").

Before the Exchange: the messages serialised again for the token estimate and walked again for the prefix
route, and an opening's error event parsed twice (by the replica, then by the router). Until later that day
(2026-12-05): a relayed error opening parsed again by a key's meter, and every content event coalesced with
the usage event parsed too.
"""

from __future__ import annotations

import asyncio
import cProfile
import json
import pickle
from collections import Counter
from typing import Any

from raystack.config import Backend, Routing
from raystack.engines.base import create_engine
from raystack.json_codec import JSONAnswer
from raystack.observability.metrics import RouterMetrics
from raystack.protocol import error_body, parse_request, prompt_text, sse_event
from raystack.replica.calls import Dispatch, Opening, _stream_failure
from raystack.replica.direct_answers import DirectAnswers
from raystack.replica.early_start import EarlyStarts
from raystack.replica.server import LLMServer
from raystack.router.auth import Grant
from raystack.router.exchange import Exchange
from raystack.router.metering import Meter
from raystack.router.policies import policy_for
from raystack.router.quotas import Quotas
from raystack.router.routing_board import RoutingBoard
from raystack.router.usage import Cost


def _key(function: Any) -> tuple[str, int, str]:
    code = function.__code__
    return code.co_filename, code.co_firstlineno, code.co_name


def _builtin(name: str) -> tuple[str, int, str]:
    return "~", 0, name


# What is counted, by the function that does it: msgspec's and the stdlib's JSON alike (json_codec.py uses
# msgspec, and the stdlib for what msgspec refuses), so a parse is counted however it is made.
PASSES = {
    _key(json.loads): "decoded",
    _builtin("<method 'decode' of 'msgspec.json.Decoder' objects>"): "decoded",
    _builtin("<built-in method msgspec._core.json_decode>"): "decoded",
    _key(json.dumps): "encoded",
    _builtin("<method 'encode' of 'msgspec.json.Encoder' objects>"): "encoded",
    _builtin("<built-in method msgspec._core.json_encode>"): "encoded",
    _builtin("<method 'validate_python' of 'pydantic_core._pydantic_core.SchemaValidator' objects>"): "validated",
    _builtin("<method 'validate_json' of 'pydantic_core._pydantic_core.SchemaValidator' objects>"): "validated",
    _key(prompt_text): "prompt_text",
    _key(_stream_failure): "opening_checked",
    _key(Meter._parse): "event_parsed",
}


class Passes:
    """A cProfile over one side of the path; `counts` after it: passes by kind."""

    def __init__(self):
        self.profile = cProfile.Profile()

    def __enter__(self) -> Passes:
        self.profile.enable()
        return self

    def __exit__(self, *_: Any) -> None:
        self.profile.disable()
        self.profile.create_stats()
        self.counts: Counter = Counter()
        for key, (_, calls, *_rest) in self.profile.stats.items():
            if key in PASSES:
                self.counts[PASSES[key]] += calls


SYSTEM = "You answer questions about Ascend clusters. " * 20


def chat_body(stream: bool, max_tokens: int) -> bytes:
    return json.dumps({"model": "synthetic", "stream": stream, "max_tokens": max_tokens, "messages": [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": "How many NPUs per node?"}]}).encode()


class Replica(LLMServer.func_or_class):
    """LLMServer outside Serve: its shutdown hook (an async __del__, which Serve awaits) left out."""

    def __del__(self) -> None:
        pass


def synthetic_replica() -> Replica:
    """An LLMServer with the synthetic engine, as its __init__ leaves it (without Serve's replica context)."""
    server = object.__new__(Replica)
    backend = Backend(name="synthetic", engine="synthetic", synthetic={"ttft_ms": 0, "tokens_per_s": 0})
    server.engine, server.replica, server.engine_failed = create_engine("synthetic", None, backend), "r1", None
    server.backend, server.early, server.direct, server.calls = backend, EarlyStarts(), DirectAnswers(), 0
    return server


async def across(raw: bytes, keyed: bool = True) -> tuple[Passes, Passes, Passes, Exchange, list[Any]]:
    """One chat request from its body to its answer's end: the router's checks, the replica's answer, the
    router's relay (whole: the response body); each side's passes."""
    policy = policy_for(Routing(policy="prefix_affinity"), RoutingBoard())
    quotas = Quotas("passes", 60) if keyed else None
    replica = synthetic_replica()
    with Passes() as router_in:
        exchange = Exchange("chat", quotas, RouterMetrics(), grant=Grant("team", None, 1) if keyed else None)
        exchange.body, exchange.size = parse_request("chat", raw), len(raw)  # as the ingress reads it
        if keyed:
            await exchange.admit()  # a key without limits: metered, the ledger not asked
        route = policy.route(exchange, [])  # the prefix blocks routing matches
        sent = pickle.dumps(Dispatch("chat", exchange.body, route))  # what crosses to the replica
    with Passes() as in_replica:
        items = [item async for item in replica.generate(pickle.loads(sent))]
    opening, rest = items[0], items[1:]
    with Passes() as router_out:
        if opening.chunk is None:
            if exchange.meter is not None:
                exchange.meter.whole(opening.status, opening.body)
            out = [JSONAnswer(opening.body).body]  # as the ingress answers it
        else:
            async def relayed():
                yield opening.chunk
                for chunk in rest:
                    yield chunk

            chunks = exchange.meter.watch(relayed()) if exchange.meter is not None else relayed()
            out = [chunk async for chunk in chunks]
    return router_in, in_replica, router_out, exchange, out


def test_a_keyed_stream_is_read_once_on_each_side():
    router_in, in_replica, router_out, exchange, out = asyncio.run(across(chat_body(True, 40)))
    assert router_in.counts == {"decoded": 1, "validated": 1, "prompt_text": 1}  # no "encoded": no re-serialising
    # 40 content events and the usage event the router asked for, each serialised once; the opening checked once
    assert in_replica.counts == {"encoded": 41, "opening_checked": 1}
    assert router_out.counts == {"decoded": 1, "event_parsed": 1}  # the usage event alone
    assert '"usage"' not in "".join(out)  # the router asked for it, the client did not: taken out
    assert (exchange.meter.cost.completion_tokens, exchange.meter.cost.settled) == (40, True)


def test_a_stream_without_a_key_is_parsed_nowhere_after_the_body():
    router_in, in_replica, router_out, _, out = asyncio.run(across(chat_body(True, 8), keyed=False))
    assert router_in.counts == {"decoded": 1, "validated": 1, "prompt_text": 1}
    assert in_replica.counts == {"encoded": 8, "opening_checked": 1}
    assert router_out.counts == {}
    assert "".join(out).count("data: {") == 8


def test_a_whole_answer_is_serialised_once_by_the_router_and_never_by_the_replica():
    router_in, in_replica, router_out, exchange, out = asyncio.run(across(chat_body(False, 4)))
    assert router_in.counts == {"decoded": 1, "validated": 1, "prompt_text": 1}
    assert in_replica.counts == {}  # the answer crosses as a dict
    assert router_out.counts == {"encoded": 1}
    assert json.loads(out[0])["usage"]["completion_tokens"] == exchange.meter.cost.completion_tokens == 4


def test_a_relayed_error_opening_is_parsed_once_in_both_processes():
    """An engine's client error as a stream's first event (a code under 500: relayed, not retried): the
    replica parses it to tell it from a failure, a key's meter knows it by its first key."""
    error = sse_event(error_body(400, "The prompt is too long.", param="messages"))
    meter = Meter(Cost(10))

    async def relayed():
        yield error + "data: [DONE]\n\n"

    async def run():
        with Passes() as replica_side:
            opening = Opening.streamed("r1", error + "data: [DONE]\n\n")
        with Passes() as router_side:
            out = [chunk async for chunk in meter.watch(relayed())]
        return opening, replica_side, router_side, out

    opening, replica_side, router_side, out = asyncio.run(run())
    assert opening.failure is None  # a client's error: relayed as it is
    assert replica_side.counts == {"opening_checked": 1, "decoded": 1}
    assert router_side.counts == {}
    assert meter.cost.error and "".join(out) == error + "data: [DONE]\n\n"


def test_content_events_coalesced_with_the_usage_event_are_counted_not_parsed():
    content = [sse_event({"choices": [{"index": 0, "delta": {"content": f" w{i}"}}]}) for i in range(5)]
    usage = sse_event({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 5}})
    meter = Meter(Cost(3), client_wants_usage=False)

    async def relayed():
        yield content[0]
        yield "".join(content[1:]) + usage + "data: [DONE]\n\n"  # what a replica's coalescing sends at the end

    async def run():
        with Passes() as passes:
            out = [chunk async for chunk in meter.watch(relayed())]
        return passes, out

    passes, out = asyncio.run(run())
    assert passes.counts == {"event_parsed": 1, "decoded": 1}
    assert "".join(out) == "".join(content) + "data: [DONE]\n\n"
    assert (meter.cost.prompt_tokens, meter.cost.completion_tokens, meter.cost.settled) == (9, 5, True)
