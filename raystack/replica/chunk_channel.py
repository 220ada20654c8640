"""The chunk channel: a stream's chunks, its first included, from the LLMServer replica straight to the router
replica that asked, over one TCP connection per (replica, router replica) pair.

Serve's streaming call carries every chunk as a gRPC message of its own, pickled, framed and woken for in
both processes: at concurrency 1 the replica and the router spent about 1.9 ms of CPU per token between them,
against 0.65 ms for vLLM's whole API server (README, "raystack vs vLLM's own server"), on the core vLLM's
EngineCore runs on. Here a chunk is one write of a small frame on a socket both processes keep open.

The call itself still goes through Serve: its request router picks the replica, a failure before the first
chunk is the call's (the router tries another replica), and cancelling the call (client gone, deadline) stops
the generation as before. The call yields nothing: the router makes the stream's opening of the first chunk
that arrives here (a whole answer is the call's one item, as before the channel). The router watches the call
until it ends, so a replica that dies before it wrote anything here still ends its streams with an error; a
broken connection ends every stream it carried. A replica that cannot reach the router's inbox answers
through Serve, its opening first, as before the channel. Over a connection a replica opened, the router may
also send it a request ahead of the call, which the replica starts about 2 ms sooner (early_start.py), or a
whole answer to give over this connection with no Serve call at all (direct_answers.py).

The inbox binds the node's Ray address on a free port, as Serve binds each replica's own gRPC port (on every
interface, with no credential: ray/serve/_private/replica.py, add_port_to_grpc_server(self._server,
"[::]:0")); it reads only connections that open with its secret, which travels in the Serve call.

A connection opens with the secret and the replica's id (one length byte, then UTF-8): the router names the
replica that answered from the connection that brought the first chunk, which may come before Serve's router
has said which replica it chose (it says so once it has read the replica's acceptance, ray/serve/_private/
router.py, on_request_routed). Then frames: a 13-byte header (request id: 8 bytes, kind: 1, payload length: 4,
network order) and the payload. Replica to router: CHUNK (SSE text, UTF-8), END (none), ERROR (the message,
UTF-8), WHOLE (a whole answer: its HTTP status in 3 ASCII digits, then its JSON body), REFUSED (none: the
replica does not take that request) and ANSWERS (request 0, none: sent once, after the greeting, by a replica
that answers ASKs; a router asks none of a replica that did not say so, as one of an older raystack during an
upgrade, which would leave the ASK unanswered). Router to replica, on the same connection: DISPATCH (the
request's kind and body, JSON: the replica starts it before its Serve call arrives, replica/early_start.py),
ASK (the same: the replica answers it whole, here, and no Serve call comes, replica/direct_answers.py) and
CANCEL (none: that start or answer is not wanted).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import secrets
import struct
from dataclasses import dataclass
from functools import partial
from typing import Callable

logger = logging.getLogger("ray.serve")

HEADER = struct.Struct("!QBI")
CHUNK, END, ERROR, WHOLE, REFUSED, ANSWERS = 0, 1, 2, 6, 7, 8  # replica -> router
DISPATCH, CANCEL, ASK = 3, 4, 5  # router -> replica
SECRET_BYTES = 16
CONNECT_TIMEOUT_S = 2.0
CONNECT_WAIT_S = 0.05  # what a stream waits for a new connection (under a millisecond within a data centre)
# A replica returns from its call just after it wrote END; the two travel different ways and may arrive in
# either order. A call that ended cleanly without END after this long lost it (its connection broke).
END_GRACE_S = 5.0


class ChannelBroken(Exception):
    """The stream cannot go on: its replica failed, or the connection carrying it broke."""


@dataclass(frozen=True)
class ReplyTo:
    """Where a replica writes one request's chunks: the router replica's inbox, its secret, the request's id."""

    host: str
    port: int
    secret: bytes
    request: int

    @property
    def inbox(self) -> tuple[str, int, bytes]:
        return self.host, self.port, self.secret


class Sink:
    """One request's chunks as they arrive, until its END (or why it broke); or a whole answer (WHOLE), or
    the replica's refusal (REFUSED: `refused`, and it ends)."""

    __slots__ = ("request", "replica", "parts", "ended", "broken", "refused", "waiter", "watch", "_late")

    def __init__(self, request: int) -> None:
        self.request = request
        self.replica: str | None = None  # the replica whose connection brought its chunks
        self.parts: list[str] = []
        self.ended = False
        self.broken: str | None = None
        self.refused = False
        self.waiter: asyncio.Future | None = None
        self.watch: asyncio.Future | None = None  # the Serve call's end (held: the loop keeps tasks weakly)
        self._late: asyncio.TimerHandle | None = None

    def put(self, chunk: str) -> None:
        self.parts.append(chunk)
        self._wake()

    def end(self) -> None:
        self.ended = True
        self._wake()

    def fail(self, why: str) -> None:
        if not self.ended and self.broken is None:
            self.broken = why
            self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def next(self) -> str | None:
        """What arrived since the last call, joined (a consumer that lags gets one item, not many), waiting
        for it if nothing did; None once the stream ended. Raises ChannelBroken once what came is read."""
        while not self.parts:
            if self.ended:
                return None
            if self.broken is not None:
                raise ChannelBroken(self.broken)
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        parts = self.parts
        self.parts = []
        return parts[0] if len(parts) == 1 else "".join(parts)

    def follow(self, call_next: asyncio.Future, describe: Callable[[BaseException], str],
               grace_s: float = END_GRACE_S) -> None:
        """Watch the Serve call's next item, `call_next` (the call yields nothing when the replica streams here),
        to the call's end: an error there (the replica died, its generator raised) breaks this stream; a clean
        end must be followed by END within `grace_s`. `describe` words an error."""
        def ended(task: asyncio.Future) -> None:
            if task.cancelled():
                return
            err = task.exception()
            if isinstance(err, StopAsyncIteration):
                if not self.ended and self.broken is None:
                    self._late = asyncio.get_running_loop().call_later(
                        grace_s, self.fail, "the replica finished, but the end of its stream never came")
            elif err is not None:
                self.fail(describe(err))
            else:  # an item through Serve as well: not a replica of this raystack
                self.fail("the replica answered on both paths")

        self.watch = call_next
        call_next.add_done_callback(ended)

    def close(self) -> None:
        if self._late is not None:
            self._late.cancel()


class Inbox:
    """A router replica's end of every channel: a TCP server on `host`, the streams it waits for by id."""

    def __init__(self) -> None:
        self.secret = secrets.token_bytes(SECRET_BYTES)
        self.sinks: dict[int, Sink] = {}
        self.receivers: set[_Receiver] = set()  # the replicas' connections
        self.by_replica: dict[str, _Receiver] = {}  # replica id -> its connection, once it said who it is
        self.ids = itertools.count(1)
        self.server: asyncio.AbstractServer | None = None
        self.host = ""
        self.port = 0

    async def start(self, host: str) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Receiver(self), host, 0)
        self.host, self.port = host, self.server.sockets[0].getsockname()[1]

    def open(self) -> tuple[ReplyTo, Sink]:
        """A new stream's address, and the Sink its chunks arrive in."""
        reply_to = self.address()
        sink = self.sinks[reply_to.request] = Sink(reply_to.request)
        return reply_to, sink

    def address(self) -> ReplyTo:
        """A new request's address here (a whole answer's, which comes through Serve, names its request so)."""
        return ReplyTo(self.host, self.port, self.secret, next(self.ids))

    def send(self, replica: str, request: int, kind: int, payload: bytes = b"") -> bool:
        """A frame to `replica` about `request`, if the replica has a connection here (for an ASK: one whose
        replica answers ASKs); whether it went. An ASK is then carried by that connection: its breaking fails the
        request's Sink."""
        receiver = self.by_replica.get(replica)
        if receiver is None or receiver.transport.is_closing() or (kind == ASK and not receiver.answers):
            return False
        receiver.transport.write(HEADER.pack(request, kind, len(payload)) + payload)
        if kind == ASK:
            receiver.carried.add(request)
        return True

    def forget(self, sink: Sink) -> None:
        """The request is over here: what still comes for it is dropped."""
        self.sinks.pop(sink.request, None)
        sink.close()

    async def stop(self) -> None:
        """No more connections; those open are closed (their replicas stop writing to them)."""
        if self.server is not None:
            self.server.close()
            for receiver in list(self.receivers):
                receiver.transport.close()
            for sink in self.sinks.values():
                sink.fail("the router is stopping")


class _Receiver(asyncio.Protocol):
    """One replica's connection to an inbox: its secret and the replica's id first, then frames."""

    def __init__(self, inbox: Inbox):
        self.inbox = inbox
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.trusted = False
        self.replica: str | None = None  # its id, once read
        self.carried: set[int] = set()  # requests this connection wrote to and has not ended
        self.answers = False  # its replica answers ASKs (it said so: ANSWERS)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.inbox.receivers.add(self)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if not self.trusted:
            if len(buffer) < SECRET_BYTES:
                return
            if not hmac.compare_digest(bytes(buffer[:SECRET_BYTES]), self.inbox.secret):
                logger.warning("chunk channel: a connection without this router's secret, closed")
                self.transport.close()
                buffer.clear()
                return
            self.trusted = True
            del buffer[:SECRET_BYTES]
        if self.replica is None:
            if not buffer or len(buffer) < 1 + buffer[0]:
                return
            self.replica = buffer[1:1 + buffer[0]].decode()
            del buffer[:1 + buffer[0]]
            self.inbox.by_replica[self.replica] = self
        sinks, carried, at, size = self.inbox.sinks, self.carried, 0, len(buffer)
        while size - at >= HEADER.size:
            request, kind, length = HEADER.unpack_from(buffer, at)
            start = at + HEADER.size
            if size - start < length:
                break
            at = start + length
            sink = sinks.get(request)
            if kind == CHUNK:
                carried.add(request)
                if sink is not None:
                    sink.replica = self.replica
                    sink.put(buffer[start:at].decode())
                continue
            carried.discard(request)
            if kind == ANSWERS:
                self.answers = True
            if sink is None:
                continue
            if kind == WHOLE:
                sink.replica = self.replica
                sink.put(buffer[start:at].decode())
                sink.end()
            elif kind == REFUSED:
                sink.refused = True
                sink.end()
            elif kind == END:
                sink.end()
            else:
                sink.fail(buffer[start:at].decode())
        del buffer[:at]

    def connection_lost(self, exc: Exception | None) -> None:
        self.inbox.receivers.discard(self)
        if self.replica is not None and self.inbox.by_replica.get(self.replica) is self:
            del self.inbox.by_replica[self.replica]
        for request in self.carried:
            sink = self.inbox.sinks.get(request)
            if sink is not None:
                sink.fail(f"the connection from its replica broke ({exc or 'closed'})")
        self.carried.clear()


class Link:
    """A replica's connection to one router replica's inbox."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self.watch: asyncio.Future | None = None  # closes the writer when the router's end closes

    def send(self, request: int, kind: int, text: str = "") -> None:
        self.send_bytes(request, kind, text.encode())

    def send_bytes(self, request: int, kind: int, payload: bytes) -> None:
        if self.writer.is_closing():  # asyncio would drop the write without a word
            raise ChannelBroken("the connection to the router broke")
        self.writer.write(HEADER.pack(request, kind, len(payload)) + payload)

    async def drain(self) -> None:
        """Wait while the router reads slower than the engine writes (past the transport's high-water mark)."""
        if self.writer.transport.get_write_buffer_size():
            await self.writer.drain()

    def close(self) -> None:
        self.writer.close()


# What a replica does with a frame from a router: (the Link it came on, the router's inbox, request id, kind,
# payload).
OnFrame = Callable[[Link, tuple[str, int, bytes], int, int, bytes], None]


async def _read_router(reader: asyncio.StreamReader, link: Link, inbox: tuple[str, int, bytes],
                       on_frame: OnFrame | None) -> None:
    """The router's frames (DISPATCH, ASK, CANCEL) to `on_frame`, with the Link they came on (an ASK is
    answered there), until its end closes (its replica stopped). Then close ours, so that the Link says it is
    broken instead of writing into a socket nobody reads."""
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while True:
            request, kind, length = HEADER.unpack(await reader.readexactly(HEADER.size))
            payload = await reader.readexactly(length) if length else b""
            if on_frame is not None:
                try:
                    on_frame(link, inbox, request, kind, payload)
                except Exception:  # one bad frame: that request is not started or answered, nothing else changes
                    logger.exception("chunk channel: a frame from the router at %s:%d failed", *inbox[:2])
    link.close()


def _usable(pending: asyncio.Future) -> Link | None:
    """The Link a connection attempt made, if it is made and still open."""
    if not pending.done() or pending.cancelled() or pending.exception() is not None:
        return None
    link = pending.result()
    return None if link.writer.is_closing() else link


class Outbox:
    """A replica's ends of its channels: one Link per router replica it answers, opened on first use. An inbox
    it could not reach is not tried again for RETRY_S: its streams go through Serve meanwhile."""

    RETRY_S = 30.0

    def __init__(self, replica: str, on_frame: OnFrame | None = None) -> None:
        """`on_frame`: what to do with the frames routers send back (early_start.py, direct_answers.py)."""
        ident = replica.encode()[:255]
        self.on_frame = on_frame
        # Written after an inbox's secret: its id, and that it answers ASKs if it takes frames at all.
        self.greeting = bytes([len(ident)]) + ident + (HEADER.pack(0, ANSWERS, 0) if on_frame is not None else b"")
        self.links: dict[tuple[str, int, bytes], asyncio.Future] = {}
        self.unreachable: dict[tuple[str, int, bytes], float] = {}  # inbox -> loop time it may be tried again

    async def link(self, reply_to: ReplyTo) -> Link | None:
        """The Link to `reply_to`'s inbox, or None while it cannot be had: a connection still being made after
        CONNECT_WAIT_S goes on in the background, and this stream goes through Serve (no stream waits longer
        for the channel)."""
        pending = self.reach(reply_to)
        if pending is None:
            return None
        if not pending.done():
            await asyncio.wait({pending}, timeout=CONNECT_WAIT_S)
        return _usable(pending)

    def reach(self, reply_to: ReplyTo) -> asyncio.Future | None:
        """The connection to `reply_to`'s inbox, made or being made (started now if there is none), or None
        while that inbox is unreachable. A whole answer asks for it without waiting: the router sends its next
        requests over it (early_start.py)."""
        key = reply_to.inbox
        if self.unreachable.get(key, 0.0) > asyncio.get_running_loop().time():
            return None
        pending = self.links.get(key)
        if pending is None or (pending.done() and _usable(pending) is None):
            self._forget_closed()  # links to router replicas that have gone since
            pending = self.links[key] = asyncio.ensure_future(self._connect(reply_to))
            pending.add_done_callback(partial(self._connected, reply_to))
        return pending

    def _forget_closed(self) -> None:
        for key, pending in list(self.links.items()):
            if pending.done() and _usable(pending) is None:
                del self.links[key]

    def _connected(self, reply_to: ReplyTo, pending: asyncio.Future) -> None:
        if pending.cancelled() or pending.exception() is None:
            return
        if self.links.get(reply_to.inbox) is pending:
            del self.links[reply_to.inbox]
        self.unreachable[reply_to.inbox] = asyncio.get_running_loop().time() + self.RETRY_S
        logger.warning("chunk channel: the router's inbox at %s:%d is unreachable (%r); streams to it go through "
                       "Serve for %g s", reply_to.host, reply_to.port, pending.exception(), self.RETRY_S)

    async def _connect(self, reply_to: ReplyTo) -> Link:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(reply_to.host, reply_to.port),
                                                CONNECT_TIMEOUT_S)
        writer.write(reply_to.secret + self.greeting)
        link = Link(writer)
        link.watch = asyncio.ensure_future(_read_router(reader, link, reply_to.inbox, self.on_frame))
        return link

    def close(self) -> None:
        for pending in self.links.values():
            link = _usable(pending)
            if link is not None:
                link.close()
            pending.cancel()  # a connection still being made
        self.links.clear()
