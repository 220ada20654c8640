"""Early starts: a request the router also sent over the chunk channel (a DISPATCH frame, chunk_channel.py)
starts in the engine when that frame arrives, about 2 ms before its Serve call reaches LLMServer.generate
(README, "raystack vs vLLM's own server": the call's way through Serve's request router, gRPC and the
replica's wrapper). The call, pinned to this replica by the router (replica_choice.py), claims the started
request and answers from it: Serve still counts the replica busy, cancels the request and reports its failures
through the call, as for any request. Routers start streams so; a whole answer they ask over the channel
itself, with no call (direct_answers.py).

Nothing of a started request leaves the replica before its call claims it (its chunks wait behind `gate`), so
a call that Serve sent elsewhere (this replica was full, or draining) never meets a second answer. A start that
no call claims within CLAIM_WAIT_S, or that the router cancels (a CANCEL frame), is aborted in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from typing import Any, AsyncIterator, Callable, Hashable

# A call reaches its replica within milliseconds of its DISPATCH frame. One that Serve's request router held
# longer (every replica full) finds its start gone, and starts the request afresh.
CLAIM_WAIT_S = 2.0
# Calls that came before their frame, remembered so that the frame is dropped when it comes.
REMEMBERED_CALLS = 4096

_END = object()


class Started:
    """One request running in the engine before its call: what it answers, held until the call claims it."""

    def __init__(self, answer: Callable[[asyncio.Event], AsyncIterator[Any]], expire: Callable[[], None]):
        self.gate = asyncio.Event()  # set when claimed: the stream may go out
        self.items: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue()
        self.task = asyncio.ensure_future(self._run(answer(self.gate)))
        self.expiry = asyncio.get_running_loop().call_later(CLAIM_WAIT_S, expire)

    async def _run(self, answer: AsyncIterator[Any]) -> None:
        try:
            async with contextlib.aclosing(answer) as items:  # closing it aborts the request in the engine
                async for item in items:
                    self.items.put_nowait((item, None))
            self.items.put_nowait((_END, None))
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # the call's to raise
            self.items.put_nowait((_END, err))

    async def claimed(self) -> AsyncIterator[Any]:
        """The answer, as the call yields it. The call ending early (cancelled: the client left) stops it."""
        self.expiry.cancel()
        self.gate.set()
        try:
            while True:
                item, err = await self.items.get()
                if err is not None:
                    raise err
                if item is _END:
                    return
                yield item
        finally:
            self.task.cancel()

    def stop(self) -> None:
        self.expiry.cancel()
        self.task.cancel()


class EarlyStarts:
    """A replica's started requests, by key (their ReplyTo: the router's inbox and the request's id there), until
    claimed."""

    def __init__(self) -> None:
        self.started: dict[Hashable, Started] = {}
        self.called: OrderedDict[Hashable, None] = OrderedDict()  # calls that found no start

    def __len__(self) -> int:
        return len(self.started)

    def start(self, key: Hashable, answer: Callable[[asyncio.Event], AsyncIterator[Any]]) -> None:
        """Run `answer(gate)` now, unless its call came first. `gate` is set once the call claims it: the
        answer sends nothing on its own (the chunk channel) before then."""
        if key in self.called or key in self.started:
            return
        self.started[key] = Started(answer, lambda: self.cancel(key))

    def claim(self, key: Hashable) -> Started | None:
        """The request started for `key`, now the caller's; None if none was (the call starts it itself)."""
        started = self.started.pop(key, None)
        if started is None:
            self.called[key] = None
            if len(self.called) > REMEMBERED_CALLS:
                self.called.popitem(last=False)
        return started

    def cancel(self, key: Hashable) -> None:
        """The start for `key` is not wanted (not claimed in time, or the router says so): abort it."""
        started = self.started.pop(key, None)
        if started is not None:
            started.stop()

    def close(self) -> None:
        for started in self.started.values():
            started.stop()
        self.started.clear()
