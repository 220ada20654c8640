"""BackendRequestRouter: Ray Serve's pluggable request router for an LLMServer deployment.

It runs inside each process holding a handle to the backend (the Router's replicas), and chooses
which replica takes each request:
  - least_loaded, weighted: two replicas sampled at random, the one with fewer requests in flight
    (Serve's probed queue lengths) wins;
  - prefix_affinity: first the replica that served the longest matching prompt prefix (routing.PREFIXES),
    while it carries at most `affinity_slack` requests more than the least-loaded replica; else as above.
Requests are matched to replicas exactly (no FIFO hand-over), so an affinity choice is never given to
another request. The router also records how many replicas each backend runs, for the Router's choice
of backend.

Serve ships this class to each handle by value (cloudpickle), so this module's globals are copies per
handle: shared state lives in `routing`, which is referenced as a module and so imported, not copied.
"""

from __future__ import annotations

import random
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from raystack.serving import routing


def route_of(pending_request: PendingRequest | None) -> tuple[int, ...]:
    """The prefix blocks the Router attached: LLMServer.generate(kind, body, route)."""
    if pending_request is None or len(pending_request.args) < 3:
        return ()
    return pending_request.args[2] or ()


class BackendRequestRouter(RequestRouter):
    def initialize_state(self, policy: str = "least_loaded", affinity_slack: int = 4, **_: Any) -> None:
        self.policy = policy
        self.affinity_slack = affinity_slack

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        routing.RUNNING_REPLICAS[self._deployment_id.name] = len(replicas)

    def in_flight(self, replica: RunningReplica) -> int:
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        ranks = []
        route = route_of(pending_request) if self.policy == "prefix_affinity" else ()
        if route and len(candidate_replicas) > 1:
            owner = routing.PREFIXES.match(route, backend=self._deployment_id.name)
            preferred = owner and next((r for r in candidate_replicas if r.replica_id.unique_id == owner[1]), None)
            if preferred is not None:
                least = min(self.in_flight(r) for r in candidate_replicas)
                if self.in_flight(preferred) <= least + self.affinity_slack:
                    ranks.append([preferred])
        # Power of two choices: Serve probes both and sends to the one with the shorter queue.
        ranks.append(random.sample(candidate_replicas, min(2, len(candidate_replicas))))
        return ranks

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        route = route_of(pending_request)
        if route:
            routing.PREFIXES.record(route, self._deployment_id.name, replica_id.unique_id)
