"""The chunk channel (replica/chunk_channel.py): a router's Inbox and a replica's Outbox on real sockets. What a
user would notice if it were wrong: chunks lost, reordered or given to another request; a stream that hangs
when its replica dies; a stranger writing into someone's answer."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from raystack.replica.chunk_channel import CHUNK, END, ERROR, ChannelBroken, Inbox, Outbox, ReplyTo


async def drain(sink) -> list[str]:
    parts = []
    while (part := await asyncio.wait_for(sink.next(), 5)) is not None:
        parts.append(part)
    return parts


async def started_inbox() -> Inbox:
    inbox = Inbox()
    await inbox.start("127.0.0.1")
    return inbox


@contextlib.asynccontextmanager
async def channel():
    """A router's inbox and a replica's outbox, both closed at the end however the test went."""
    inbox, outbox = await started_inbox(), Outbox("r1")
    try:
        yield inbox, outbox
    finally:
        outbox.close()
        await inbox.stop()


def test_chunks_of_interleaved_requests_reach_their_own_stream_in_order():
    async def main():
        async with channel() as (inbox, outbox):
            (to_a, sink_a), (to_b, sink_b) = inbox.open(), inbox.open()
            link = await outbox.link(to_a)
            assert link is not None and await outbox.link(to_b) is link  # one connection per router replica
            big = "data: " + "é" * 300_000 + "\n\n"  # split over many reads, multi-byte characters across them
            for i in range(50):
                link.send(to_a.request, CHUNK, f"a{i} ")
                link.send(to_b.request, CHUNK, f"b{i} ")
            link.send(to_b.request, CHUNK, big)
            link.send(to_a.request, END)
            link.send(to_b.request, END)
            await link.drain()
            assert "".join(await drain(sink_a)) == "".join(f"a{i} " for i in range(50))
            assert "".join(await drain(sink_b)) == "".join(f"b{i} " for i in range(50)) + big

    asyncio.run(main())


def test_a_consumer_that_lags_gets_what_arrived_meanwhile_as_one_item():
    async def main():
        async with channel() as (inbox, outbox):
            to, sink = inbox.open()
            link = await outbox.link(to)
            for word in ("one ", "two ", "three "):
                link.send(to.request, CHUNK, word)
            link.send(to.request, END)
            await asyncio.sleep(0.2)  # all of it arrived before the consumer looks
            assert await drain(sink) == ["one two three "]

    asyncio.run(main())


def test_an_error_frame_ends_the_stream_after_what_came_before_it():
    async def main():
        async with channel() as (inbox, outbox):
            to, sink = inbox.open()
            link = await outbox.link(to)
            link.send(to.request, CHUNK, "data: partial\n\n")
            link.send(to.request, ERROR, "RuntimeError: the engine died")
            assert await sink.next() == "data: partial\n\n"
            with pytest.raises(ChannelBroken, match="the engine died"):
                await sink.next()

    asyncio.run(main())


def test_a_connection_that_breaks_ends_every_stream_it_carried_and_the_replica_stops_writing():
    async def main():
        async with channel() as (inbox, outbox):
            (to_a, sink_a), (to_b, sink_b) = inbox.open(), inbox.open()
            link = await outbox.link(to_a)
            link.send(to_a.request, CHUNK, "a")
            link.send(to_b.request, CHUNK, "b")
            assert await sink_a.next() == "a" and await sink_b.next() == "b"
            link.writer.transport.abort()  # the replica's process is gone
            for sink in (sink_a, sink_b):
                with pytest.raises(ChannelBroken, match="connection from its replica broke"):
                    await asyncio.wait_for(sink.next(), 5)
            with pytest.raises(ChannelBroken):
                link.send(to_a.request, CHUNK, "lost")  # never dropped without a word
            relinked = await outbox.link(to_a)  # the next stream gets a new connection
            assert relinked is not None and relinked is not link

    asyncio.run(main())


def test_a_stopped_router_closes_its_connections_and_the_replica_forgets_them():
    async def main():
        gone, kept, outbox = await started_inbox(), await started_inbox(), Outbox("r1")
        to_gone, _ = gone.open()
        old = await outbox.link(to_gone)
        await gone.stop()  # its replica replaced: Router.__del__
        for _ in range(100):
            if old.writer.is_closing():
                break
            await asyncio.sleep(0.01)
        with pytest.raises(ChannelBroken):
            old.send(to_gone.request, CHUNK, "after the end")
        to_kept, sink = kept.open()
        assert await outbox.link(to_kept) is not None
        assert list(outbox.links) == [to_kept.inbox]  # the link to the stopped router is gone
        outbox.close()
        await kept.stop()

    asyncio.run(main())


def test_a_connection_without_the_inbox_secret_is_closed_and_writes_nothing():
    async def main():
        async with channel() as (inbox, outbox):
            to, sink = inbox.open()
            forged = ReplyTo(to.host, to.port, b"x" * len(to.secret), to.request)
            link = await outbox.link(forged)
            link.send(forged.request, CHUNK, "injected")
            link.send(forged.request, END)
            await asyncio.sleep(0.3)
            assert sink.parts == [] and not sink.ended

    asyncio.run(main())


def test_frames_for_a_request_the_router_forgot_are_dropped_and_others_go_on():
    async def main():
        async with channel() as (inbox, outbox):
            (gone, gone_sink), (kept, kept_sink) = inbox.open(), inbox.open()
            inbox.forget(gone_sink)  # its client left
            link = await outbox.link(kept)
            link.send(gone.request, CHUNK, "late")
            link.send(gone.request, END)
            link.send(kept.request, CHUNK, "fine")
            link.send(kept.request, END)
            assert await drain(kept_sink) == ["fine"]
            assert gone.request not in inbox.sinks

    asyncio.run(main())


def test_an_unreachable_inbox_sends_the_stream_through_serve_without_waiting_each_time():
    async def main():
        inbox = await started_inbox()
        to, _ = inbox.open()
        await inbox.stop()
        await asyncio.sleep(0.05)
        outbox = Outbox("r1")
        assert await outbox.link(to) is None  # refused: through Serve
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await outbox.link(to) is None
        assert loop.time() - started < 0.01  # not tried again for RETRY_S
        assert outbox.unreachable

    asyncio.run(main())


def call_next(ends_with: BaseException, after_s: float = 0.05) -> asyncio.Future:
    """What Sink.follow watches: the Serve call's next item, ending with `ends_with` after `after_s`."""
    async def next_item():
        await asyncio.sleep(after_s)
        raise ends_with

    return asyncio.ensure_future(next_item())


def test_a_replica_that_dies_before_writing_a_chunk_ends_the_stream_with_why():
    async def main():
        inbox = await started_inbox()
        _, sink = inbox.open()
        sink.follow(call_next(RuntimeError("ActorDiedError: the replica's process died")), lambda e: str(e))
        with pytest.raises(ChannelBroken, match="process died"):
            await asyncio.wait_for(sink.next(), 5)
        await inbox.stop()

    asyncio.run(main())


def test_a_call_that_ended_cleanly_waits_a_grace_for_its_end_frame_then_breaks():
    async def main():
        async with channel() as (inbox, outbox):
            (to, sink), (_, lost) = inbox.open(), inbox.open()
            sink.follow(call_next(StopAsyncIteration(), after_s=0), str, grace_s=1)  # Serve's end came before END
            lost.follow(call_next(StopAsyncIteration(), after_s=0), str, grace_s=0.1)  # and this one's END never comes
            await asyncio.sleep(0.2)
            link = await outbox.link(to)
            link.send(to.request, CHUNK, "last")
            link.send(to.request, END)
            assert await drain(sink) == ["last"]
            with pytest.raises(ChannelBroken, match="the end of its stream never came"):
                await asyncio.wait_for(lost.next(), 5)

    asyncio.run(main())


def test_a_replica_streams_everything_through_a_reached_inbox_and_an_engine_failure_through_serve():
    """The replica's side (LLMServer with the synthetic engine, outside Serve): a stream to a router whose inbox
    it reached goes there whole, its first chunk included, and nothing goes through Serve's call; a stream
    whose first event is the engine's own failure goes through Serve as its Opening, where the router takes it
    as a failure and tries another replica without reading it again."""
    from raystack.protocol import error_body, sse_event
    from raystack.replica.calls import Dispatch, Opening
    from tests.unit.test_request_passes import synthetic_replica

    async def failing():
        yield sse_event(error_body(500, "the engine ran out of blocks")) + "data: [DONE]\n\n"

    async def main():
        async with channel() as (inbox, outbox):
            replica = synthetic_replica()
            replica.outbox = outbox
            to, sink = inbox.open()
            body = {"model": "synthetic", "stream": True, "max_tokens": 3, "prompt": "one two three"}
            through_serve = [item async for item in replica.generate(Dispatch("completion", body, reply_to=to))]
            assert through_serve == []
            streamed = "".join(await drain(sink))
            assert sink.replica == replica.replica  # the router names the replica from the connection
            assert streamed.count('"text"') == 3 and streamed.endswith("data: [DONE]\n\n")

            to, sink = inbox.open()
            link = await outbox.link(to)
            through_serve = [item async for item in replica._streamed(failing(), link, to.request)]
            assert len(through_serve) == 1 and isinstance(through_serve[0], Opening)
            assert through_serve[0].failure == "the engine ran out of blocks"
            assert replica.engine_failed == "the engine ran out of blocks"  # its next health check probes it
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(sink.next(), 0.3)  # nothing came through the channel

    asyncio.run(main())
