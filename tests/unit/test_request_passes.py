"""How often the router reads a request's body and its answer's chunks: a keyed chat stream under
prefix_affinity, from the body as it arrives to the answer's last chunk, counted with cProfile (nothing
replaced). The body is decoded and validated once, its prompt text made once, and the answer parsed as JSON
only where an event carries usage or an error; the opening's failure check is made once, by the replica.

Before the Exchange: the body decoded and validated once, but its messages serialised again for the token
estimate (json.dumps) and walked again for the prefix route, and an opening's error event parsed twice
(by the replica, then by the router)."""

from __future__ import annotations

import asyncio
import cProfile
import json
import pstats
from collections import Counter

from raystack.config import Routing
from raystack.observability.metrics import RouterMetrics
from raystack.protocol import parse_request, sse_event
from raystack.replica.calls import Opening
from raystack.router.auth import Grant
from raystack.router.exchange import Exchange
from raystack.router.policies import policy_for
from raystack.router.quotas import Quotas
from raystack.router.routing_board import RoutingBoard

SYSTEM = "You answer questions about Ascend clusters. " * 20
RAW = json.dumps({"model": "m", "stream": True, "messages": [
    {"role": "system", "content": SYSTEM}, {"role": "user", "content": "How many NPUs per node?"}]}).encode()
CHUNKS = [sse_event({"choices": [{"index": 0, "delta": {"content": f"w{i} "}}]}) for i in range(40)]
USAGE = sse_event({"choices": [], "usage": {"prompt_tokens": 120, "completion_tokens": 40}})


def calls(profile: cProfile.Profile) -> Counter:
    """Calls per function name, for the names this test watches."""
    watched = {"loads", "dumps", "model_validate", "prompt_text", "_stream_failure", "_read"}
    counts: Counter = Counter()
    for (_, _, name), (_, calls_made, *_rest) in pstats.Stats(profile).stats.items():
        if name in watched:
            counts[name] += calls_made
    return counts


async def one_request() -> list[str]:
    exchange = Exchange("chat", Quotas("passes", 60), RouterMetrics(), grant=Grant("team", None, 1))
    exchange.body, exchange.size = parse_request("chat", RAW), len(RAW)  # as the ingress reads it
    await exchange.admit()  # a key without limits: metered, the ledger not asked
    policy = policy_for(Routing(policy="prefix_affinity"), RoutingBoard())
    assert policy.route(lambda: exchange.prompt)  # the prefix blocks routing matches
    opening = Opening.streamed("r1", CHUNKS[0])  # the replica's check of its first chunk

    async def relayed():
        yield opening.chunk
        for chunk in (*CHUNKS[1:], USAGE, "data: [DONE]\n\n"):
            yield chunk

    return [chunk async for chunk in exchange.meter.watch(relayed())]


def test_the_router_reads_each_request_once_and_parses_only_the_usage_event():
    profile = cProfile.Profile()
    profile.enable()
    out = asyncio.run(one_request())
    profile.disable()
    counts = calls(profile)
    assert counts["loads"] == 2  # the body, and the usage event (the only event that carries usage)
    assert counts["model_validate"] == 1 and counts["prompt_text"] == 1
    assert counts["dumps"] == 0  # no serialisation of the body for the estimate
    assert counts["_stream_failure"] == 1 and counts["_read"] == 1
    assert '"usage"' not in "".join(out)  # the router asked for it, the client did not: taken out
