"""Direct answers (replica/direct_answers.py): a whole answer a router asks for over the chunk channel comes back
there with no Serve call, on a real Inbox and Outbox and an LLMServer with the synthetic engine (outside Serve),
and Serve's autoscaling policy counts them. What a user would notice if it were wrong: an answer lost or given
twice, a full or stopping replica that takes more anyway, a request that runs on in the engine after the router
gave it up, an engine failure that hangs the request instead of failing its try, a replica stopped under its
answers, a backend that does not scale under load."""

from __future__ import annotations

import asyncio

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from raystack.json_codec import decode, encode
from raystack.replica.chunk_channel import ASK, CANCEL, HEADER, ChannelBroken
from raystack.replica.direct_answers import AUTOSCALING_METRIC, autoscaling_policy
from tests.unit.test_early_start import WHOLE, connected, until

SLOW = {**WHOLE, "max_tokens": 50}  # 50 tokens at the pace below: about a second


def ask(inbox, replica, body: dict):
    """An ASK for `body`'s whole answer, and the Sink it comes back in."""
    to, sink = inbox.open()
    assert inbox.send(replica.replica, to.request, ASK, encode({"kind": "completion", "body": body}))
    return to, sink


def paced(replica, max_ongoing: int = 8) -> None:
    """Answers at 50 tokens/s (SLOW: about a second), at most `max_ongoing` at once."""
    replica.backend = replica.backend.model_copy(update={"max_ongoing_requests": max_ongoing})
    replica.engine.settings = replica.engine.settings.model_copy(update={"tokens_per_s": 50})


def test_an_asked_whole_answer_comes_back_over_the_channel_once_with_no_serve_call():
    async def main():
        async with connected() as (inbox, replica):
            _, sink = ask(inbox, replica, WHOLE)
            text = await asyncio.wait_for(sink.next(), 5)
            assert text[:3] == "200" and sink.replica == replica.replica
            answer = decode(text[3:])
            assert answer["usage"]["completion_tokens"] == 3 and answer["object"] == "text_completion"
            assert await sink.next() is None  # and nothing more
            assert replica.engine.completed == 1 and replica.calls == 0 and len(replica.direct) == 0
            assert replica.record_autoscaling_stats() == {AUTOSCALING_METRIC: 0}

    asyncio.run(main())


def test_a_full_replica_refuses_and_its_engine_never_sees_the_request():
    async def main():
        async with connected() as (inbox, replica):
            paced(replica, max_ongoing=1)
            _, first = ask(inbox, replica, SLOW)
            await until(lambda: replica.engine.running == 1)
            assert replica.record_autoscaling_stats() == {AUTOSCALING_METRIC: 1}  # what Serve's autoscaler adds
            _, second = ask(inbox, replica, WHOLE)
            assert await asyncio.wait_for(second.next(), 5) is None and second.refused  # the router goes through Serve
            assert (await asyncio.wait_for(first.next(), 5))[:3] == "200"
            assert replica.engine.completed == 1

    asyncio.run(main())


def test_a_cancelled_answer_stops_in_the_engine():
    async def main():
        async with connected() as (inbox, replica):
            paced(replica)
            to, sink = ask(inbox, replica, SLOW)
            await until(lambda: replica.engine.running == 1)
            assert inbox.send(replica.replica, to.request, CANCEL)  # the client left
            await until(lambda: replica.engine.cancelled == 1)
            assert replica.engine.running == 0 and len(replica.direct) == 0 and replica.engine.completed == 0

    asyncio.run(main())


def test_an_engine_failure_fails_the_try_with_the_engines_words():
    class Breaking:
        async def generate(self, kind, body):
            raise RuntimeError("the NPU fell off the bus")

    async def main():
        async with connected() as (inbox, replica):
            replica.engine = Breaking()
            _, sink = ask(inbox, replica, WHOLE)
            with pytest.raises(ChannelBroken, match="RuntimeError: the NPU fell off the bus"):
                await asyncio.wait_for(sink.next(), 5)
            assert replica.engine_failed == "RuntimeError: the NPU fell off the bus"  # the health check probes it

    asyncio.run(main())


def test_a_replica_whose_connection_breaks_fails_the_answers_it_carried():
    async def main():
        async with connected() as (inbox, replica):
            paced(replica)
            _, sink = ask(inbox, replica, SLOW)
            await until(lambda: replica.engine.running == 1)
            replica.outbox.close()  # as when its process dies
            with pytest.raises(ChannelBroken, match="connection from its replica broke"):
                await asyncio.wait_for(sink.next(), 5)

    asyncio.run(main())


def test_a_stopping_replica_finishes_its_answers_and_takes_no_more():
    async def main():
        async with connected() as (inbox, replica):
            paced(replica)
            _, under_way = ask(inbox, replica, SLOW)
            await until(lambda: replica.engine.running == 1)
            draining = asyncio.ensure_future(replica.direct.drain(30))  # as LLMServer.__del__ does first
            await asyncio.sleep(0)
            _, late = ask(inbox, replica, WHOLE)
            assert await asyncio.wait_for(late.next(), 5) is None and late.refused
            assert not draining.done()
            assert (await asyncio.wait_for(under_way.next(), 5))[:3] == "200"
            await asyncio.wait_for(draining, 5)
            assert replica.engine.completed == 1

    asyncio.run(main())


def context(total_num_requests: float, direct: dict[str, float]) -> AutoscalingContext:
    """Serve's context for a 2-replica backend aiming at 2 requests per replica, with the direct answers
    its replicas reported."""
    deployment = DeploymentID(name="LLMServer-m-s", app_name="m")
    replicas = [ReplicaID(unique_id=name, deployment_id=deployment) for name in ("a", "b")]
    config = AutoscalingConfig(min_replicas=1, max_replicas=10, target_ongoing_requests=2)
    return AutoscalingContext(
        deployment_id=deployment, deployment_name=deployment.name, app_name="m", current_num_replicas=2,
        target_num_replicas=2, running_replicas=replicas, total_num_requests=total_num_requests,
        total_queued_requests=0, aggregated_metrics={AUTOSCALING_METRIC: {r: direct[r.unique_id] for r in replicas}},
        raw_metrics={}, capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=10, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=0.0, config=config)


def test_serves_autoscaling_counts_the_direct_answers_with_its_own():
    assert autoscaling_policy(context(4, {"a": 0, "b": 0}))[0] == pytest.approx(2)  # Serve's own count alone
    assert autoscaling_policy(context(4, {"a": 6, "b": 2}))[0] == pytest.approx(6)  # 12 requests at 2 a replica
    assert autoscaling_policy(context(0, {"a": 8, "b": 8}))[0] == pytest.approx(8)  # all of them direct


def test_a_replica_that_does_not_say_it_answers_is_asked_nothing():
    async def main():
        async with connected(linked=False) as (inbox, replica):
            # An older replica's greeting (upgrades mix versions): its id, without ANSWERS. It would read an ASK
            # as nothing it knows and leave the request waiting until its deadline.
            replica.outbox.greeting = replica.outbox.greeting[:-HEADER.size]
            assert await replica.outbox.link(inbox.address()) is not None
            await until(lambda: replica.replica in inbox.by_replica)
            to, _ = inbox.open()
            assert not inbox.send(replica.replica, to.request, ASK, encode({"kind": "completion", "body": WHOLE}))
            assert inbox.send(replica.replica, to.request, CANCEL)  # the frames it knows still go

    asyncio.run(main())
