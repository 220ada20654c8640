"""coalesce(): chunks leave as soon as they exist; a busy consumer gets them joined, none lost."""

import asyncio

import pytest

from raystack.replica.server import coalesce


async def ticking(n, delay, log=None):
    try:
        for i in range(n):
            await asyncio.sleep(delay)
            yield f"{i};"
    finally:
        if log is not None:
            log.append("closed")


def test_a_fast_consumer_gets_every_chunk_alone():
    async def run():
        return [c async for c in coalesce(ticking(5, 0.01))]

    assert asyncio.run(run()) == ["0;", "1;", "2;", "3;", "4;"]


def test_a_slow_consumer_gets_chunks_joined_without_loss():
    async def run():
        out = []
        async for chunk in coalesce(ticking(20, 0.001)):
            out.append(chunk)
            await asyncio.sleep(0.02)
        return out

    out = asyncio.run(run())
    assert "".join(out) == "".join(f"{i};" for i in range(20))
    assert len(out) < 20


def test_engine_errors_reach_the_consumer_after_the_chunks_before_them():
    async def failing():
        yield "a;"
        raise RuntimeError("engine died")

    async def run():
        got = []
        with pytest.raises(RuntimeError, match="engine died"):
            async for chunk in coalesce(failing()):
                got.append(chunk)
        return got

    assert asyncio.run(run()) == ["a;"]


def test_leaving_early_closes_the_engine_stream():
    async def run():
        log = []
        stream = coalesce(ticking(100, 0.01, log))
        async for _ in stream:
            break
        await stream.aclose()
        await asyncio.sleep(0.05)
        return log

    assert asyncio.run(run()) == ["closed"]
