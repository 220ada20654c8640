"""LLMServer: the Serve deployment that owns one engine instance per replica."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator

from ray import serve

from raystack.cluster.rank_layout import require_whole_tensor_groups
from raystack.config import Backend
from raystack.engines.base import AdapterLoadError, Answer, RequestKind, create_engine
from raystack.json_codec import decode, encode
from raystack.models.adapters import ReplicaAdapters, Unservable, prepare_adapters
from raystack.models.replica_weights import prepare_on_every_node
from raystack.observability.metrics import ReplicaMetrics
from raystack.process import pin_granted_npus, restore_normal_priority
from raystack.protocol import error_body
from raystack.replica.calls import Dispatch, Opening
from raystack.replica.chunk_channel import (ASK, CANCEL, CHUNK, DISPATCH, END, ERROR, REFUSED, WHOLE, ChannelBroken,
                                            Link, Outbox, ReplyTo)
from raystack.replica.direct_answers import AUTOSCALING_METRIC, DirectAnswers
from raystack.replica.early_start import EarlyStarts

logger = logging.getLogger("ray.serve")

_END = object()


async def coalesce(stream: AsyncIterator[str]) -> AsyncIterator[str]:
    """Yield each chunk as soon as it exists; chunks that arrived while the consumer was busy go out
    joined in one item. No timer: a lone chunk is never held back waiting for company."""
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for chunk in stream:
                queue.put_nowait(chunk)
            queue.put_nowait(_END)
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # hand engine errors to the consumer
            queue.put_nowait(err)

    task = asyncio.create_task(pump())
    try:
        while True:
            parts = [await queue.get()]
            while not queue.empty() and parts[-1] is not _END and not isinstance(parts[-1], BaseException):
                parts.append(queue.get_nowait())
            tail = parts[-1]
            if tail is _END or isinstance(tail, BaseException):
                parts.pop()
            if parts:
                yield "".join(parts)
            if tail is _END:
                return
            if isinstance(tail, BaseException):
                raise tail
    finally:
        # The consumer left (client disconnect, error): cancelling the pump closes the engine's
        # stream, which aborts the request in the engine.
        task.cancel()


@serve.deployment
class LLMServer:
    """One replica = one engine on the CPUs/NPUs Ray granted this replica."""

    async def __init__(self, model_name: str, source: str | None, backend: dict[str, Any], cache_dir: str,
                       cache_shared: bool = False, adapters: list[dict[str, str]] | None = None,
                       kv_events: bool = False):
        """`adapters`: the model's LoRA adapters ({name, source}), served if the engine takes adapters.
        `kv_events`: the model routes by KV cache (kv_aware): the engine publishes its KV cache events, if it
        can, under this replica's id as topic (record_replica_metadata says where)."""
        restore_normal_priority()  # before the engine starts: its processes inherit it
        pin_granted_npus()  # likewise: the engine sees only this replica's NPUs
        self.backend = Backend.model_validate(backend)
        self.model_name = model_name
        self.replica = serve.get_replica_context().replica_id.unique_id
        tensor_group = self.backend.spec.placement(self.backend).tensor_group if self.backend.device == "npu" else 0
        if tensor_group > 1:  # ranks over nodes: before anything is downloaded or started
            await asyncio.to_thread(require_whole_tensor_groups, tensor_group)
        model_path = None
        if self.backend.loads_model:  # here, and on every other node this replica's ranks run on
            model_path = await asyncio.to_thread(prepare_on_every_node, source, cache_dir, cache_shared, logger.info)
        self.adapters = ReplicaAdapters()
        if adapters and self.backend.spec.serves_adapters:
            self.adapters = await asyncio.to_thread(prepare_adapters, model_name, adapters, model_path, cache_dir,
                                                    cache_shared, logger.info)
        # Serve's model multiplexing: the adapters this replica holds are reported to every router, whose
        # request router sends an adapter's requests to replicas that hold it (replica_choice.py).
        async def hold(name: str) -> str:  # a function, not a bound method: Serve keeps its cache on it
            return await self._load_adapter(name)

        self.hold_adapter = serve.multiplexed(max_num_models_per_replica=self.backend.adapters_per_replica)(hold)
        self.metrics = ReplicaMetrics(model_name, self.backend.name, self.replica)
        self.engine_failed: str | None = None  # what the engine said when it last failed a request on its side
        self.outbox = Outbox(self.replica, self._router_frame)  # streams to the routers that ask (chunk_channel.py)
        self.early = EarlyStarts()  # requests a router dispatched over that channel, started before their call
        self.direct = DirectAnswers()  # whole answers a router asked for over that channel, with no call
        self.calls = 0  # Serve calls in progress here
        self.engine = create_engine(model_name, model_path, self.backend, self.metrics, self.adapters.served,
                                    kv_events_topic=self.replica if kv_events else None)
        await self.engine.start()
        logger.info("%s@%s ready (%s engine, %s)", model_name, self.backend.name, self.backend.engine,
                    model_path or "no model files")

    def reconfigure(self, registration: dict[str, Any]) -> None:
        """Serve hands over the deployment's user_config: the backend as its router reads it from Serve's
        state (router/catalogue.py). The replica was built from the same settings: nothing to change."""

    def record_replica_metadata(self) -> dict[str, Any]:
        """Serve's hook for what a replica says of itself once, when it is ready (Ray 2.60,
        ray/serve/_private/replica.py: called once after __init__; deployment_state.py carries it in each
        RunningReplicaInfo the controller broadcasts): every router's request router sees it as
        `RunningReplica.replica_metadata` from the moment it can route to this replica. `kv_events`: where
        this replica's engine publishes its KV cache events (VLLMEngine.kv_events), when it does."""
        kv_events = self.engine.kv_events() if self.backend.spec.publishes_kv_events else None
        return {"kv_events": kv_events} if kv_events else {}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's hook for a replica's own autoscaling metrics (Ray 2.60, ray/serve/_private/replica.py,
        _fetch_custom_autoscaling_metrics: called each metrics_interval_s of an autoscaling backend): the whole
        answers it gives with no Serve call, which Serve does not count (direct_answers.py)."""
        return {AUTOSCALING_METRIC: len(self.direct)}

    async def _load_adapter(self, name: str) -> str:
        """Serve's multiplexing calls this for an adapter the replica does not hold yet. Past
        adapters_per_replica it forgets the least recently used: the engine keeps that one registered, in
        memory bounded by its own cache (vLLM's max_cpu_loras), and routers stop preferring this replica
        for it."""
        await self.engine.load_adapter(name)
        logger.info("adapter %s loaded", name)
        return name

    async def _adapter_refusal(self, name: str) -> Unservable | None:
        """Why this replica cannot answer through adapter `name` (the router sent only adapters of this
        model), else None once it holds it."""
        if name in self.adapters.unservable:
            return self.adapters.unservable[name]
        if name not in self.adapters.served:  # a router that read another config of this model: not an engine fault
            return Unservable(404, f"Adapter `{name}` is not one of this replica's; it serves: "
                                   f"{', '.join(self.adapters.served) or 'none'}.")
        try:
            await self.hold_adapter(name)
        except AdapterLoadError as err:
            return Unservable(400, f"Adapter `{name}` cannot be loaded: {err}")
        return None

    async def generate(self, call: Dispatch) -> AsyncIterator[Any]:
        """Streams the answer to `call` (its kind and body): an Opening, then (for a stream) further SSE
        strings; from the request its router started here already (its DISPATCH frame), if it did. A request
        through an adapter names it as Serve's multiplexed model id, and in its body's `model`."""
        self.calls += 1
        try:
            started = self.early.claim(call.reply_to) if call.reply_to is not None else None
            answer = (started.claimed() if started is not None else
                      self._answer(call.kind, call.body, call.reply_to, serve.get_multiplexed_model_id()))
            async with contextlib.aclosing(answer) as items:
                async for item in items:
                    yield item
        finally:
            self.calls -= 1

    def _router_frame(self, link: Link, inbox: tuple[str, int, bytes], request: int, kind: int,
                      payload: bytes) -> None:
        """A router's DISPATCH starts its request now, its ASK answers it whole over `link` (direct_answers.py),
        unless this replica is full (Serve would send the call elsewhere) or stopping: an ASK is then REFUSED
        (the router sends it through Serve). Its CANCEL aborts that start or answer."""
        reply_to = ReplyTo(*inbox, request)  # the key of its start or answer, as its call would name it
        if kind == CANCEL:
            self.early.cancel(reply_to)
            self.direct.cancel(reply_to)
            return
        if self.direct.stopping or self.calls + len(self.early) + len(self.direct) >= self.backend.max_ongoing_requests:
            if kind == ASK:
                with contextlib.suppress(ChannelBroken):  # the router went: nobody to tell
                    link.send(request, REFUSED)
            return
        asked = decode(payload)  # only requests without an adapter are sent ahead
        if kind == ASK:
            self.direct.start(reply_to, self._answer_directly(link, request, asked["kind"], asked["body"]))
        elif kind == DISPATCH:
            self.early.start(reply_to, lambda gate: self._answer(asked["kind"], asked["body"], reply_to, "", gate))

    async def _answer_directly(self, link: Link, request: int, kind: RequestKind, body: dict[str, Any]) -> None:
        """The whole answer to an ASK, over `link` (WHOLE: the status in 3 digits, then the JSON body), or the
        engine's failure (ERROR), which the router takes as a failed try, as it takes a failed Serve call."""
        try:
            answer = await self._engine_answer(kind, body)
            if answer.stream is not None:  # a router asks only for whole answers: not an engine of this raystack
                with contextlib.suppress(AttributeError):
                    await answer.stream.aclose()  # the request aborted in the engine
                raise RuntimeError("the engine streamed an answer asked for whole")
            opening = self._noted(Opening.whole(self.replica, answer.status, answer.body))
            link.send_bytes(request, WHOLE, b"%03d" % opening.status + encode(opening.body))
        except ChannelBroken:  # the router went: nobody to answer
            pass
        except Exception as err:
            with contextlib.suppress(ChannelBroken):
                link.send(request, ERROR, f"{type(err).__name__}: {err}")

    async def _engine_answer(self, kind: RequestKind, body: dict[str, Any]) -> Answer:
        """The engine's answer; its failure noted (the next health check probes it) and raised."""
        try:
            return await self.engine.generate(kind, body)
        except Exception as err:
            self.engine_failed = f"{type(err).__name__}: {err}"
            raise

    async def _answer(self, kind: str, body: dict[str, Any], reply_to: ReplyTo | None, adapter: str,
                      gate: asyncio.Event | None = None) -> AsyncIterator[Any]:
        """The answer to a request of `kind` with `body`, through LoRA `adapter` if any. A stream goes through
        the chunk channel to `reply_to` when it can, once `gate` (if any) is set; a whole answer goes through
        Serve, and opens the channel to `reply_to` for the router's next requests."""
        refusal = await self._adapter_refusal(adapter) if adapter else None
        if refusal is not None:
            yield Opening.whole(self.replica, refusal.status,
                                error_body(refusal.status, refusal.message, param="model", code="adapter_unservable"))
            return
        answer = await self._engine_answer(kind, body)
        if answer.stream is None:
            if reply_to is not None:
                self.outbox.reach(reply_to)
            yield self._noted(Opening.whole(self.replica, answer.status, answer.body))
            return
        link = await self.outbox.link(reply_to) if reply_to is not None else None
        async for item in self._streamed(answer.stream, link, reply_to.request if link else 0, gate):
            yield item

    async def _streamed(self, stream: AsyncIterator[str], link: Link | None, request: int,
                        gate: asyncio.Event | None = None) -> AsyncIterator[Any]:
        """The stream through `link` to the router (chunk_channel.py), its first chunk included, with nothing
        through Serve; through Serve when `link` is None or the first chunk is the engine's failure: that chunk
        as its Opening, then the rest. Chunks are taken as `coalesce` joins them: what the engine wrote at once
        goes at once, so the opening carries vLLM's first token with its role chunk (both come from one engine
        step; sent apart, the median TTFT at concurrency 1 came out 18 ms worse: README, "raystack vs vLLM's own
        server"). The engine's failure before its first chunk is the call's (the router tries another
        replica); after it, through the channel, an ERROR frame (the router ends the stream with an error
        event) as well. Nothing goes through the channel before `gate`, if any, is set (early_start.py)."""
        opened = False
        async with contextlib.aclosing(coalesce(stream)) as chunks:  # closed: the request aborted in the engine
            try:
                async for chunk in chunks:
                    if not opened:
                        opening = self._noted(Opening.streamed(self.replica, chunk))
                        if opening.failure:  # through Serve, where the router knows it without reading it again
                            link = None
                    if link is None:
                        yield chunk if opened else opening
                    else:
                        if gate is not None and not gate.is_set():
                            await gate.wait()
                        link.send(request, CHUNK, chunk)
                        await link.drain()
                    opened = True
                if link is not None:
                    link.send(request, END)
            except Exception as err:
                if opened and link is not None and not isinstance(err, ChannelBroken):
                    with contextlib.suppress(ChannelBroken):
                        link.send(request, ERROR, f"{type(err).__name__}: {err}")
                raise

    def _noted(self, opening: Opening) -> Opening:
        """Notes whether the engine failed on its side (the next health check then probes it)."""
        self.engine_failed = opening.failure
        return opening

    async def stats(self) -> dict[str, int]:
        """This replica's engine load (Engine.stats): requests running and waiting in the engine."""
        return self.engine.stats()

    async def check_health(self) -> None:
        await self.engine.check_health()
        if self.engine_failed:  # its last answer was a failure of its own: can it still answer at all?
            await self._probe_engine()
        load = self.engine.stats()  # Serve calls this every health_check_period_s: the gauges follow
        self.metrics.load(load["running"], load["waiting"])

    async def _probe_engine(self) -> None:
        """A one-token completion through the engine: it failed its last request, and the router now keeps
        traffic away from it, so only this can tell a passing fault (healthy again) from a dead engine
        (raise: Serve replaces the replica)."""
        probe = {"model": self.model_name, "prompt": "ping", "max_tokens": 1, "stream": False}
        answer = await self.engine.generate("completion", probe)
        failure = Opening.whole(self.replica, answer.status, answer.body).failure
        if failure:
            raise RuntimeError(f"the engine failed a request ({self.engine_failed}) and a probe since: {failure}")
        self.engine_failed = None

    async def __del__(self) -> None:
        """Serve's shutdown hook for a replica (its only one: Serve awaits the deployment's `__del__` when it
        stops a replica, ray/serve/_private/replica.py call_destructor; Ray Serve LLM's LLMServer stops its
        engine the same way): the engine and every process it started stop before the replica goes."""
        direct = getattr(self, "direct", None)
        if direct is not None:  # Serve drained its own calls, not these: they finish before the engine stops
            await direct.drain(self.backend.longest_answer_s)
        engine = getattr(self, "engine", None)  # absent when __init__ failed
        if engine is not None:
            await engine.shutdown()
        early = getattr(self, "early", None)
        if early is not None:
            early.close()
        outbox = getattr(self, "outbox", None)
        if outbox is not None:
            outbox.close()
