"""Early starts (replica/early_start.py): a request the router dispatched over the chunk channel starts in the
engine before its Serve call, on a real Inbox and Outbox and an LLMServer with the synthetic engine (outside
Serve). What a user would notice if it were wrong: an answer given twice, or to nobody; a request that runs on
in the engine after the router gave it up; a call that finds nothing and hangs."""

from __future__ import annotations

import asyncio
import contextlib

from raystack.json_codec import encode
from raystack.replica.calls import Dispatch, Opening
from raystack.replica.chunk_channel import CANCEL, DISPATCH, Inbox, Outbox
from tests.unit.test_chunk_channel import drain
from tests.unit.test_request_passes import synthetic_replica

STREAM = {"model": "synthetic", "stream": True, "max_tokens": 3, "prompt": "one two three"}
WHOLE = {"model": "synthetic", "max_tokens": 3, "prompt": "one two three"}


@contextlib.asynccontextmanager
async def connected(linked: bool = True):
    """A router's inbox, and a replica whose outbox has connected to it (as after its first answer there), or
    not yet (`linked` False)."""
    inbox = Inbox()
    await inbox.start("127.0.0.1")
    replica = synthetic_replica()
    replica.outbox = Outbox(replica.replica, replica._router_frame)
    try:
        if linked:
            assert await replica.outbox.link(inbox.address()) is not None
            await until(lambda: replica.replica in inbox.by_replica)
        yield inbox, replica
    finally:
        replica.early.close()
        replica.outbox.close()
        await inbox.stop()


def dispatch(inbox: Inbox, replica, request: int, body: dict) -> None:
    assert inbox.send(replica.replica, request, DISPATCH, encode({"kind": "completion", "body": body}))


async def until(condition, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never came true")


def test_a_dispatched_stream_runs_before_its_call_and_goes_out_once_when_the_call_claims_it():
    async def main():
        async with connected() as (inbox, replica):
            to, sink = inbox.open()
            dispatch(inbox, replica, to.request, STREAM)
            await until(lambda: replica.engine.completed == 1)  # the engine answered before any call came
            await asyncio.sleep(0.1)
            assert sink.parts == [] and not sink.ended  # but nothing left the replica
            through_serve = [item async for item in replica.generate(Dispatch("completion", STREAM, reply_to=to))]
            assert through_serve == []  # the call claimed it: the stream went through the channel
            streamed = "".join(await drain(sink))
            assert streamed.count('"text"') == 3 and streamed.endswith("data: [DONE]\n\n")
            assert replica.engine.completed == 1 and len(replica.early) == 0  # answered once

    asyncio.run(main())


def test_a_dispatched_whole_answer_is_the_calls_answer():
    async def main():
        async with connected() as (inbox, replica):
            to = inbox.address()
            dispatch(inbox, replica, to.request, WHOLE)
            await until(lambda: replica.engine.completed == 1)
            items = [item async for item in replica.generate(Dispatch("completion", WHOLE, reply_to=to))]
            assert len(items) == 1 and isinstance(items[0], Opening) and items[0].status == 200
            assert items[0].body["usage"]["completion_tokens"] == 3
            assert replica.engine.completed == 1

    asyncio.run(main())


def test_a_start_the_router_cancels_is_gone_and_its_call_still_answers_once():
    """The router cancels a start whose call Serve sent elsewhere, or that failed; a call that comes anyway
    (it was only late) starts the request itself."""
    async def main():
        async with connected() as (inbox, replica):
            to, sink = inbox.open()
            dispatch(inbox, replica, to.request, STREAM)
            inbox.send(replica.replica, to.request, CANCEL)
            await until(lambda: len(replica.early) == 0)
            assert [item async for item in replica.generate(Dispatch("completion", STREAM, reply_to=to))] == []
            streamed = "".join(await drain(sink))
            assert streamed.count('"text"') == 3
            assert replica.engine.completed == 1  # the cancelled start never answered

    asyncio.run(main())


def test_a_start_no_call_claims_is_aborted_in_the_engine(monkeypatch):
    from raystack.replica import early_start

    monkeypatch.setattr(early_start, "CLAIM_WAIT_S", 0.2)
    slow = dict(STREAM, max_tokens=50)

    async def main():
        async with connected() as (inbox, replica):
            replica.engine.settings = replica.engine.settings.model_copy(update={"tokens_per_s": 20})
            to, sink = inbox.open()
            dispatch(inbox, replica, to.request, slow)
            await until(lambda: replica.engine.running == 1)
            await until(lambda: replica.engine.running == 0)  # aborted after CLAIM_WAIT_S
            assert replica.engine.cancelled == 1 and replica.engine.completed == 0
            assert len(replica.early) == 0 and sink.parts == []

    asyncio.run(main())


def test_a_frame_that_comes_after_its_call_starts_nothing():
    async def main():
        async with connected() as (inbox, replica):
            to, sink = inbox.open()
            assert [item async for item in replica.generate(Dispatch("completion", STREAM, reply_to=to))] == []
            dispatch(inbox, replica, to.request, STREAM)  # overtaken by its call
            await asyncio.sleep(0.2)
            assert len(replica.early) == 0 and replica.engine.completed == 1
            assert "".join(await drain(sink)).count('"text"') == 3

    asyncio.run(main())


def test_a_whole_answer_opens_the_channel_for_the_routers_next_requests():
    """A whole answer through Serve opens the channel, over which the router sends its next requests (direct
    answers now; a whole answer's DISPATCH, as a router of the release before sends it, still starts there)."""
    async def main():
        async with connected(linked=False) as (inbox, replica):
            items = [item async for item in replica.generate(Dispatch("completion", WHOLE,
                                                                      reply_to=inbox.address()))]
            assert items[0].status == 200  # answered through Serve, without waiting for the connection
            await until(lambda: replica.replica in inbox.by_replica)
            to = inbox.address()
            dispatch(inbox, replica, to.request, WHOLE)
            await until(lambda: replica.engine.completed == 2)  # started on its frame
            items = [item async for item in replica.generate(Dispatch("completion", WHOLE, reply_to=to))]
            assert items[0].status == 200
            assert replica.engine.completed == 2

    asyncio.run(main())
