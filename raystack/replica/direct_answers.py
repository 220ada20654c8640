"""Direct answers: a whole (non-streamed) answer a router asked for over the chunk channel (an ASK frame) and
gets back there (WHOLE), with no Serve call at all.

Why: for a short whole answer, Serve's call was most of the path's CPU (its request router, gRPC both ways
with a rejection message first, the replica's wrapper and metrics). On two cores at concurrency 32, raystack
carried 743 short requests/s with the call and 1,970 without it (README, "Router overhead").

What the call did for such a request is done here instead:
- capacity: the replica refuses the ASK (REFUSED) when its Serve calls, early starts and direct answers reach
  max_ongoing_requests, or once it is stopping. The router then sends the request through Serve, as before
  direct answers: Serve queues it, or routes it elsewhere.
- drain: a replica that stops finishes its direct answers before its engine stops (LLMServer.__del__, which
  Serve awaits once its own calls have drained), within the backend's graceful_shutdown_timeout_s.
- autoscaling: the replica reports the direct answers it is giving (LLMServer.record_autoscaling_stats), and
  raystack's autoscaling policy (autoscaling_policy, below) adds them to the requests Serve counts.
- failure: an engine failure is an ERROR frame, a replica that dies breaks the connection; either way the
  router tries another replica, as when a Serve call fails before its answer.
- cancellation: the router's CANCEL (its client left, or the deadline passed) cancels the answer, which aborts
  the request in the engine.
Serve's own request metrics of the deployment (its request counter and latency histogram) do not see direct
answers; raystack's metrics do (router and replica).
"""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine, Hashable


class DirectAnswers:
    """A replica's direct answers under way, by key (their ReplyTo)."""

    def __init__(self) -> None:
        self.running: dict[Hashable, asyncio.Task] = {}
        self.stopping = False  # the replica is stopping: it takes no more

    def __len__(self) -> int:
        return len(self.running)

    def start(self, key: Hashable, answer: Coroutine) -> None:
        task = self.running[key] = asyncio.ensure_future(answer)
        task.add_done_callback(lambda done: self.running.pop(key, None) if self.running.get(key) is done else None)

    def cancel(self, key: Hashable) -> None:
        task = self.running.get(key)
        if task is not None:
            task.cancel()

    async def drain(self, timeout_s: float) -> None:
        """Take no more; wait for those under way, up to `timeout_s`."""
        self.stopping = True
        if self.running:
            await asyncio.wait(list(self.running.values()), timeout=timeout_s)


# What each replica reports of its direct answers (LLMServer.record_autoscaling_stats): Serve averages it over
# the backend's look_back_period_s, per replica, and hands it to the policy below (ray/serve/_private/
# autoscaling_state.py, _get_aggregated_custom_metrics; AutoscalingContext.aggregated_metrics).
AUTOSCALING_METRIC = "raystack_direct_answers"


def autoscaling_policy(ctx: Any) -> tuple[float, dict[str, Any]]:
    """Serve's default autoscaling policy (replica_queue_length_autoscaling_policy), over the requests Serve
    counts plus the direct answers the replicas report. Serve applies the backend's bounds, factors and
    delays around it, as around its own (autoscaling_state.py, _apply_autoscaling_config). Serve pickles this
    function by value into its controller (config.py, AutoscalingPolicy.serialize_policy): it names nothing
    of raystack but this module's constant."""
    from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

    direct = sum((ctx.aggregated_metrics or {}).get(AUTOSCALING_METRIC, {}).values())
    if direct:
        ctx.total_num_requests = ctx.total_num_requests + direct  # a cached property: this value is the one read
    return replica_queue_length_autoscaling_policy(ctx)
