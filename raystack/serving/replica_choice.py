"""BackendRequestRouter: Ray Serve's pluggable request router for an LLMServer deployment.

It runs inside each process holding a handle to the backend (the Router's replicas) and asks the
model's routing policy (policies.py) which replicas to try for each request, reading the request's
`route` keyword (LLMServer.generate's), leaving out replicas that just failed (`avoid`, and
policies.FAILING), and telling the Forwarder which replica took each `attempt`. Requests are matched to replicas exactly (no FIFO hand-over), so
an affinity choice is never given to another request. It also records how many replicas each backend
runs, for the Router's choice of backend.

Serve ships this class to each handle by value (cloudpickle), so this module's globals are copies per
handle: shared state lives in `policies`, which is referenced as a module and so imported, not copied.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from raystack.serving import policies


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
        return self.policy.choose_replicas(self._deployment_id.name, usable, route_of(pending_request),
                                           self.in_flight)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        self.policy.routed(self._deployment_id.name, replica_id.unique_id, route_of(pending_request))
        attempt = _kwarg(pending_request, "attempt", "")
        if attempt:
            policies.ROUTED[attempt] = replica_id.unique_id
