"""BackendRequestRouter: Ray Serve's pluggable request router for an LLMServer deployment.

It runs inside each process holding a handle to the backend (the Router's replicas) and asks the
model's routing policy (policies.py) which replicas to try for each request, reading the request's
`route` keyword (LLMServer.generate's), leaving out replicas that just failed (`avoid`, and
policies.FAILING), preferring replicas that hold a request's LoRA adapter, and telling the Forwarder which
replica took each `attempt`. Requests are matched to replicas exactly (no FIFO hand-over), so
an affinity choice is never given to another request. It also records how many replicas each backend
runs, for the Router's choice of backend.

Serve ships this class to each handle by value (cloudpickle), so this module's globals are copies per
handle: shared state lives in `policies`, which is referenced as a module and so imported, not copied.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from raystack.router import policies


def route_of(pending_request: PendingRequest | None) -> policies.Route:
    """The route the Router attached: LLMServer.generate(kind, body, route=...)."""
    if pending_request is None:
        return ()
    return pending_request.kwargs.get("route") or ()


def _kwarg(pending_request: PendingRequest | None, name: str, default: Any) -> Any:
    return pending_request.kwargs.get(name, default) if pending_request is not None else default


class BackendRequestRouter(RequestRouter):
    def initialize_state(self, **routing: Any) -> None:
        """`routing`: the model's routing settings (config.Routing), as build_backend passes them."""
        self.policy = policies.policy_for(routing)
        self.affinity_slack = routing.get("affinity_slack", 0)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        policies.RUNNING_REPLICAS[self._deployment_id.name] = len(replicas)
        policies.FAILING.keep_only({r.replica_id.unique_id for r in replicas})

    def in_flight(self, replica: RunningReplica) -> int:
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        # Not a replica that just failed: this request's earlier tries', or any request's lately.
        usable = policies.FAILING.usable(candidate_replicas, _kwarg(pending_request, "avoid", ()))
        ranks = self.policy.choose_replicas(self._deployment_id.name, usable, route_of(pending_request),
                                            self.in_flight)
        adapter = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if adapter:
            ranks.insert(0, self.holding(adapter, usable))
        return [rank for rank in ranks if rank]

    def holding(self, adapter: str, replicas: list[RunningReplica]) -> list[RunningReplica]:
        """The replicas that hold LoRA `adapter` loaded (Serve's multiplexed model ids, which replicas report)
        and carry at most affinity_slack requests more than the least loaded: an adapter's requests stay
        where it is loaded without piling onto one replica."""
        holders = [r for r in replicas if adapter in r.multiplexed_model_ids]
        least = min(map(self.in_flight, replicas), default=0)
        return [r for r in holders if self.in_flight(r) <= least + self.affinity_slack]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        self.policy.routed(self._deployment_id.name, replica_id.unique_id, route_of(pending_request))
        attempt = _kwarg(pending_request, "attempt", "")
        if attempt:
            policies.ROUTED[attempt] = replica_id.unique_id
