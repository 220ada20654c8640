"""Forwarding: one checked request to a backend of its model, and its answer back, every wait bounded.

The ingress (ingress.py) has already authenticated, parsed and resolved the request. Here: the model's routing
policy (policies.py) picks the backend; the request goes to it through its Serve handle (Serve's request
router, replica_choice.py, picks the replica), or, asked whole, over the chunk channel to the replica that
request router would pick, with no Serve call (replica/direct_answers.py); the opening (a whole JSON answer,
or a stream's first chunk) is awaited within `first_token_timeout_s`; a stream is relayed until it ends or
`request_timeout_s` passes. While a backend is full, requests wait for its slots by priority class, and within
a class by API key in weighted fair order (fair_share.py), within `first_token_timeout_s` or their class's
queue_timeout_s; each try tells the engine the request's class (priority.py). A replica that fails before its
opening, its process or its engine (a 5xx answer or error event of its own) -> another replica, never the one
that failed, which new requests also avoid for a while (the RoutingBoard's `failing`); after `router.retries`
such tries, 503. A backend whose replicas and queue are full, or that sheds the request's class -> the model's
other backends, then 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from functools import partial
from typing import AsyncIterator

from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from raystack.config import Model, RouterConfig, Routing
from raystack.json_codec import decode, encode
from raystack.observability.metrics import RouterMetrics
from raystack.protocol import SSE_DONE, OpenAIError, error_body, sse_event
from raystack.replica.calls import Dispatch, Opening
from raystack.replica.chunk_channel import ASK, CANCEL, DISPATCH, END_GRACE_S, ChannelBroken, Inbox, Sink
from raystack.router import routing_board
from raystack.router.catalogue import Catalogue
from raystack.router.exchange import Delivery, Exchange
from raystack.router.fair_share import ONE_BAND, Band, FairGate, GateFull, QueueTimeout
from raystack.router.policies import BackendLoad, LeastLoaded, Route, policy_for
from raystack.router.priority import tell_engine

logger = logging.getLogger("ray.serve")

# A full queue empties as requests finish (seconds for most LLM answers): ask clients to come back soon.
BUSY_RETRY_AFTER_S = 1


class ReplicaFailed(Exception):
    """A replica failed before answering (its process, or its engine on its side): the request may go to
    another one, never back to `replica`."""

    def __init__(self, message: str, replica: str | None = None):
        super().__init__(message)
        self.replica = replica


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


def _ended_cleanly(call_next: asyncio.Future) -> bool:
    """Whether a Serve call's next item turned out to be its clean end."""
    return call_next.done() and not call_next.cancelled() and isinstance(call_next.exception(), StopAsyncIteration)


def _described(err: BaseException) -> str:
    """A replica's failure in a line: its type and the last line of its text (a remote traceback's)."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[-1][:300] if text else 'no detail'}"


class Forwarder:
    def __init__(self, settings: RouterConfig, metrics: RouterMetrics, inbox: Inbox | None = None):
        """`inbox`: where replicas send a stream's chunks after its opening (chunk_channel.py); None: through
        Serve's call."""
        self.settings = settings
        self.metrics = metrics
        self.inbox = inbox
        self.streams: dict[str, dict[str, DeploymentHandle]] = {}  # model -> backend -> streaming handle
        self.deployments: dict[str, dict[str, str]] = {}  # model -> backend -> Serve deployment name
        self.policies: dict[str, LeastLoaded] = {}
        self.board = routing_board.BOARD  # shared with Serve's request routers of this process
        self.in_flight: Counter[tuple[str, str]] = Counter()  # (model, backend) -> requests not yet done
        self.handles: dict[tuple[str, str], DeploymentHandle] = {}  # (application, deployment) -> its handle
        self.routing: dict[str, Routing] = {}  # model -> its routing settings
        self.gates: dict[tuple[str, str], FairGate] = {}  # (model, backend) -> its slots, shared fairly by keys
        self.by_priority: set[tuple[str, str]] = set()  # (model, backend) whose engine schedules by priority
        self.router_replicas = 1  # of this router (the Router counts them): each takes its part of a backend

    def capacity(self, model: str, backend: str, max_ongoing: int) -> int | None:
        """The requests this router replica may have in flight at `backend`: its part of the running
        replicas' max_ongoing_requests; None while none runs (Serve's queue holds them, for its autoscaler)."""
        running = self.running_replicas(model, backend)
        return -(-running * max_ongoing // self.router_replicas) if running else None

    def update(self, catalogue: Catalogue) -> None:
        """Forward to the backends of `catalogue` from now on. A backend's handle (and the replica choice
        state of its request router) and a model's routing policy are kept while they stay the same."""
        handles, streams, deployments, gates, by_priority = {}, {}, {}, {}, set()
        routing: dict[str, Routing] = {}
        sources: dict[str, tuple[str | None, str | None]] = {}  # model -> its (source, cache_dir): kv_aware tokenizes
        for (model, backend), ref in catalogue.refs.items():
            where = (ref.app, ref.deployment)
            handles[where] = self.handles.get(where) or serve.get_deployment_handle(
                ref.deployment, ref.app, _check_exists=False).options(stream=True)
            streams.setdefault(model, {})[backend] = handles[where]
            deployments.setdefault(model, {})[backend] = ref.deployment
            routing[model] = ref.spec.model.routing
            sources.setdefault(model, (ref.spec.model.source, ref.spec.cache_dir))
            settings = ref.spec.backend
            gate = gates[model, backend] = self.gates.get((model, backend)) or FairGate()  # its slots in use stay
            gate.capacity = partial(self.capacity, model, backend, settings.max_ongoing_requests)
            running = min(settings.max_ongoing_requests,
                          settings.spec.running_limit(settings) or settings.max_ongoing_requests)
            gate.slots = partial(self.capacity, model, backend, running)
            gate.max_waiting = settings.max_queued_requests
            gate.observe = partial(self.metrics.queue_depth, model, backend)
            if settings.spec.schedules_by_priority(settings):
                by_priority.add((model, backend))
        self.policies = {model: self.policies[model] if self.routing.get(model) == routing[model]
                         else policy_for(routing[model], self.board, model_source=sources[model])
                         for model in routing}
        self.handles, self.streams, self.deployments, self.routing, self.gates, self.by_priority = (
            handles, streams, deployments, routing, gates, by_priority)

    def choose(self, model: Model, route: Route, exclude: set[str]) -> str | None:
        deployments = self.deployments.get(model.name, {})  # a backend deleted since `model` was resolved: not it
        policy = self.policies.get(model.name)
        able = [b for b in model.backends if b.name not in exclude and b.name in deployments]
        if not able or policy is None:
            return None
        if len(able) > 1:
            able = policy.candidates(able)
        if len(able) == 1:  # every policy's choice of one
            return able[0].name
        loads = [BackendLoad(b.name, deployments[b.name], b.weight, self.in_flight[model.name, b.name],
                             self.board.running.get(deployments[b.name])) for b in able]
        return policy.choose_backend(loads, route)

    async def send(self, exchange: Exchange) -> Delivery:
        """`exchange`'s request to a backend of its model (the pinned one, or the policy's choice; never one
        unable to honour the request) until one opens its answer, which becomes the exchange's delivery.
        Through its LoRA adapter, if any: Serve's request router then prefers the replicas that hold it (its
        multiplexed model id). A full backend gives its slots in the turn of the request's API key."""
        model = exchange.model
        policy = self.policies.get(model.name) or policy_for(model.routing, self.board)
        route = policy.route(exchange, list(self.deployments.get(model.name, {}).values()))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout_s
        busy: dict[str, str] = {}  # backends whose replicas and queue are full -> why (GateFull.reason)
        failed: list[str] = []  # replicas that failed this request
        failures = 0
        while True:
            backend = exchange.pinned or self.choose(model, route, exclude=busy.keys() | exchange.unable)
            if backend is None or backend in busy:
                raise self._busy(exchange, set(busy.values()))
            tell_engine(exchange.body, exchange.band, (model.name, backend) in self.by_priority)
            call = Dispatch(exchange.kind, exchange.body, route, tuple(failed))
            try:
                opening, stream, sink = await self.open(model.name, backend, call, deadline, exchange.adapter,
                                                        exchange.share, exchange.band)
            except GateFull as err:
                busy[backend] = err.reason
                continue
            except BackPressureError:
                busy[backend] = "queue_full"
                continue
            except QueueTimeout:
                raise self._busy(exchange, {"queue_timeout"}) from None
            except ReplicaFailed as err:
                failures += 1
                if err.replica:
                    failed.append(err.replica)
                    self.board.failing.add(err.replica)
                self.metrics.replica_failed(model.name, backend)
                logger.warning("%s@%s replica %s failed before answering (attempt %d): %s", model.name, backend,
                               err.replica or "?", failures, err)
                if failures > self.settings.retries:
                    raise OpenAIError(
                        503, f"`{exchange.requested}` failed before answering, {failures} tries ({err}); "
                        f"retry shortly, and see `serve status` if it persists.",
                        headers={"Retry-After": str(BUSY_RETRY_AFTER_S)},
                    ) from None
                continue
            key = (model.name, backend)
            exchange.delivery = Delivery(model.name, backend, opening, stream, deadline,
                                         release=partial(self.done, key, exchange.band, sink, call),
                                         cached_tokens=call.cached_tokens, sink=sink)
            return exchange.delivery

    def _busy(self, exchange: Exchange, reasons: set[str]) -> OpenAIError:
        """The answer to a request no backend of its model would take, or keep waiting, saying why: 429 when
        it may not wait (as llm-d refuses sheddable requests), 503 when it waited its class's queue_timeout_s
        (as the Gateway API Inference Extension answers a request whose queue TTL ran out); Retry-After."""
        band, model, status = exchange.band, exchange.requested, 429
        if "queue_timeout" in reasons:
            reason, status, why = "queue_timeout", 503, (
                f"Every replica of `{model}` stayed busy for the {band.queue_timeout_s:g} s a `{band.name}` request "
                f"may wait (its class's queue_timeout_s)")
        elif "shed" in reasons:
            reason, why = "shed", (f"`{model}` is saturated, and requests of class `{band.name}` give way to more "
                                   f"urgent ones")
        elif "class_queue_full" in reasons:
            reason, why = "class_queue_full", (f"Every replica of `{model}` is busy, and {band.max_queued} requests of "
                                               f"class `{band.name}` wait already (its max_queued)")
        else:
            reason, why = "queue_full", (f"Every replica of `{model}` is busy and its queue is full; raise the "
                                         f"backend's max_queued_requests or max_replicas if this persists")
        self.metrics.refused(exchange.model_name, band.name, reason)
        return OpenAIError(status, f"{why}. Retry in {BUSY_RETRY_AFTER_S} s.", headers={
            "Retry-After": str(BUSY_RETRY_AFTER_S)}, code="rate_limit_exceeded" if status == 429 else None)

    async def open(
        self, model: str, backend: str, call: Dispatch, deadline: float, adapter: str | None = None,
        share: tuple[str, float] = ("", 1.0), band: Band = ONE_BAND,
    ) -> tuple[Opening, DeploymentResponseGenerator | None, Sink | None]:
        """Send `call` to `backend` (to none of the replicas it avoids) and wait for its opening (a stream's
        first chunk, or the whole JSON answer), and the Sink of the stream's other chunks if the replica sends
        them through the chunk channel. A whole answer comes over the chunk channel with no Serve call (no
        stream, then) once a replica of the backend has connected here. The backend's in-flight count holds
        until the answer is fully relayed."""
        handle = self.streams.get(model, {}).get(backend)
        if handle is None:
            raise OpenAIError(503, f"`{model}@{backend}` was just removed from this router's backends; retry.",
                              headers={"Retry-After": str(BUSY_RETRY_AFTER_S)})
        key = (model, backend)
        streaming = bool(call.body.get("stream"))
        loop = asyncio.get_running_loop()
        wait_s = deadline - loop.time()  # a whole answer may wait for a slot until its deadline, a stream not
        asked = loop.time()
        try:  # a slot of the backend, in the turn of the request's class and key when it is full
            await self.gates[key].acquire(*share, timeout_s=min(self.settings.first_token_timeout_s, wait_s)
                                          if streaming else wait_s, band=band)
        except TimeoutError:
            raise self._timed_out(model, backend, streaming) from None
        self.metrics.queue_wait(model, band.name, loop.time() - asked)
        self.in_flight[key] += 1
        if adapter:
            handle = handle.options(multiplexed_model_id=adapter)
        sink = None
        if self.inbox is not None and not streaming and not adapter:  # an adapter loads in a call (multiplexing)
            try:
                opening = await self._ask_directly(model, backend, call, deadline)
            except BaseException:
                self.done(key, band)
                raise
            if opening is not None:
                return opening, None, None
        if self.inbox is not None:  # a whole answer names its address: its replica connects, for the next ones
            call.reply_to, sink = self.inbox.open() if streaming else (self.inbox.address(), None)
        if not adapter:  # Serve's request router prefers the replicas holding the adapter: no pin
            self._pin(self.deployments[model][backend], call, start=sink is not None)
        stream: DeploymentResponseGenerator = handle.generate.remote(call)
        first = asyncio.ensure_future(stream.__anext__())
        # A replica that reached the inbox streams everything there and nothing through Serve.
        channel_first = asyncio.ensure_future(sink.next()) if sink is not None else None
        answered = False
        try:
            # A stream's first token is bounded by first_token_timeout_s; a whole answer by the request's
            # deadline, except that no request waits longer than first_token_timeout_s for a replica.
            await asyncio.wait({first, channel_first} - {None}, return_when=asyncio.FIRST_COMPLETED,
                               timeout=min(self.settings.first_token_timeout_s, deadline - loop.time()))
            if channel_first is not None and not channel_first.done() and _ended_cleanly(first):
                await asyncio.wait({channel_first}, timeout=END_GRACE_S)  # the call's end overtook its chunks
            if channel_first is not None and channel_first.done():
                opening = self._channel_opening(channel_first, sink.replica or call.replica)
                answered = True
                self._unpin(call, opening.replica)
                sink.follow(first, _described)
                self.metrics.stream_opened(model, backend, "channel")
                return opening, stream, sink
            if not first.done() and not streaming and self.running_replicas(model, backend) != 0:
                await asyncio.wait({first}, timeout=deadline - loop.time())
            if not first.done():
                raise self._timed_out(model, backend, streaming)
            try:
                opening = first.result()
            except BackPressureError:  # the backend's queue is full: send() tries another backend
                raise
            except DeploymentUnavailableError as err:
                raise OpenAIError(503, f"`{model}@{backend}` is unavailable: {err}. See `serve status`.") from None
            except StopAsyncIteration:
                raise ReplicaFailed("it closed the answer without a word", call.replica) from None
            except Exception as err:
                raise ReplicaFailed(_described(err), call.replica) from None
            if opening.failure:  # the engine's own failure, not the client's: another replica may well answer
                raise ReplicaFailed(f"its engine failed: {opening.failure}", opening.replica)
            answered = True
            self._unpin(call, opening.replica)
            if sink is not None:  # the replica could not reach the inbox: the whole stream came through Serve
                channel_first.cancel()
                channel_first.add_done_callback(_retrieve)
                self.inbox.forget(sink)
                sink = None
            if streaming:
                self.metrics.stream_opened(model, backend, "serve")
            return opening, stream, sink
        finally:
            if not answered:  # failed, timed out, or the client left: free the replica
                for pending in (first, channel_first):
                    if pending is not None:
                        pending.cancel()
                        pending.add_done_callback(_retrieve)  # its exception is known and handled here
                stream.cancel()
                self._unpin(call)
                self.done(key, band, sink, call)

    async def _ask_directly(self, model: str, backend: str, call: Dispatch, deadline: float) -> Opening | None:
        """`call`'s whole answer, asked over the chunk channel of the replica Serve's request router would pick
        now, and given there with no Serve call (replica/direct_answers.py); None when it cannot be (that replica
        has not connected here, or answers no ASK, or it refused: full or stopping): then through Serve."""
        router = self.board.routers.get(self.deployments[model][backend])
        if router is None or not self.inbox.by_replica:  # no replica has connected (yet, or ever: inbox unreachable)
            return None
        replica = router.pick(call)
        reply_to, sink = self.inbox.open()
        if replica is None or not self._send_ahead(replica, call, reply_to.request, ASK):
            self.inbox.forget(sink)
            return None
        # Routed there now, as Serve's request router notes it once the replica accepts: what its KV cache holds
        # of the prompt (kv_aware) is read before the request's own blocks join it.
        router.routed(call, replica)
        self.board.ahead.add(replica)  # in its queue as this process's request routers see it (Serve never will)
        answered = False
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    text = await sink.next()
            except TimeoutError:
                raise self._timed_out(model, backend, streaming=False) from None
            except ChannelBroken as err:  # its engine failed (ERROR), or its connection broke (the replica died)
                answered = True
                raise ReplicaFailed(str(err), replica) from None
            answered = True
            if sink.refused:
                return None
            if text is None:
                raise ReplicaFailed("it closed the answer without a word", replica)
            opening = Opening.whole(replica, int(text[:3]), decode(text[3:]))
            if opening.failure:
                raise ReplicaFailed(f"its engine failed: {opening.failure}", replica)
            return opening
        finally:
            self.board.ahead.remove(replica)
            self.inbox.forget(sink)
            if not answered:  # timed out, or the client left: stop it in the engine
                self.inbox.send(replica, reply_to.request, CANCEL)

    def _pin(self, deployment: str, call: Dispatch, start: bool) -> None:
        """Pin `call` to the replica Serve's request router would pick now, which routes it there first, counted
        there until it does (routing_board.Ahead). A stream (`start`) starts there now, before the Serve call
        arrives (replica/early_start.py), if that replica has connected here."""
        router = self.board.routers.get(deployment)
        replica = router.pin(call) if router is not None else None
        if replica is not None and start and self._send_ahead(replica, call, call.reply_to.request, DISPATCH):
            call.started = True

    def _send_ahead(self, replica: str, call: Dispatch, request: int, kind: int) -> bool:
        """`call`'s kind and body in a `kind` frame (DISPATCH or ASK) about `request` to `replica`, if it has
        connected here (it answered this router before)."""
        if not self.inbox.send(replica, request, kind, encode({"kind": call.kind, "body": call.body})):
            return False
        # The replica may share this core (raystack's processes are kept off the engine's cores): let it start
        # the request now, before this process goes on (-0.6 ms to the engine for an early start at
        # concurrency 1 on 2 cores; README, "raystack vs vLLM's own server").
        os.sched_yield()
        return True

    def _unpin(self, call: Dispatch, answered_by: str | None = None) -> None:
        """The replica `call` started on early is not the one that answered, or none did: abort that start
        (its replica would only after a while, early_start.CLAIM_WAIT_S)."""
        if call.started and call.pinned != answered_by:
            self.inbox.send(call.pinned, call.reply_to.request, CANCEL)

    @staticmethod
    def _channel_opening(channel_first: asyncio.Future, replica: str | None) -> Opening:
        """The Opening of a stream's first chunk through the chunk channel, from `replica` (the one whose
        connection brought it), or ReplicaFailed: none came. Not an engine failure: a replica sends that opening
        through Serve (LLMServer._streamed)."""
        try:
            chunk = channel_first.result()
        except ChannelBroken as err:
            raise ReplicaFailed(f"its chunk channel broke: {err}", replica) from None
        if chunk is None:
            raise ReplicaFailed("it closed the answer without a word", replica)
        return Opening(replica or "?", chunk=chunk)

    def done(self, key: tuple[str, str], band: Band = ONE_BAND, sink: Sink | None = None,
             call: Dispatch | None = None) -> None:
        self.in_flight[key] -= 1
        if call is not None:  # Serve never routed its call: it failed first, or the stream came over the channel
            self.board.ahead.settle(call)
        gate = self.gates.get(key)
        if gate is not None:
            gate.release(band)
        if sink is not None:
            self.inbox.forget(sink)

    def running_replicas(self, model: str, backend: str) -> int | None:
        """As this process's handle last heard from Serve; None until it has."""
        deployment = self.deployments.get(model, {}).get(backend)
        return self.board.running.get(deployment) if deployment else None

    def _timed_out(self, model: str, backend: str, streaming: bool) -> OpenAIError:
        if self.running_replicas(model, backend) == 0:
            return OpenAIError(
                503,
                f"No replica of `{model}@{backend}` came up within {self.settings.first_token_timeout_s:g} s "
                f"(router.first_token_timeout_s). It is scaling from zero or cannot start: `serve status` "
                f"shows which; retry shortly.",
                headers={"Retry-After": str(BUSY_RETRY_AFTER_S)},
            )
        limit = "first_token_timeout_s" if streaming else "request_timeout_s"
        return OpenAIError(
            504,
            f"`{model}@{backend}` did not answer within router.{limit}; its replicas are overloaded or stuck. "
            f"Retry later, or raise max_replicas.",
        )

    async def relay(self, delivery: Delivery) -> AsyncIterator[str]:
        """The stream's chunks, its opening first, until it ends or the request's deadline passes. It notes
        on the delivery when the replica has sent everything; its Exchange gives the slot back."""
        served = "@".join(delivery.key)
        # The chunk channel's Sink ends with None, Serve's stream with StopAsyncIteration.
        next_chunk = delivery.sink.next if delivery.sink is not None else delivery.stream.__anext__
        try:
            yield delivery.opening.chunk
            while True:
                try:
                    async with asyncio.timeout_at(delivery.deadline):  # one timer handle per chunk, no task
                        chunk = await next_chunk()
                except StopAsyncIteration:
                    chunk = None
                if chunk is None:
                    delivery.upstream_done = True
                    return
                yield chunk
        # After the first token the status line is gone: the stream ends with an error event.
        except TimeoutError:
            self.metrics.error(delivery.model, 504)
            yield sse_event(error_body(504, f"`{served}` did not finish within router.request_timeout_s "
                                            f"({self.settings.request_timeout_s:g} s); the answer is incomplete."))
            yield SSE_DONE
        except Exception as err:
            # Serve's stream broke, so the call is over; a channel may break with the call still running.
            delivery.upstream_done = not isinstance(err, ChannelBroken)
            logger.warning("stream from %s broke: %r", served, err)
            self.metrics.error(delivery.model, 502)
            yield sse_event(error_body(502, f"The replica of `{served}` failed mid-stream ({type(err).__name__}); "
                                            f"the answer is incomplete. Retry the request."))
            yield SSE_DONE
