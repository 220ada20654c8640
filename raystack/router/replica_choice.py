"""BackendRequestRouter: Ray Serve's pluggable request router for an LLMServer deployment.

It runs inside each process holding a handle to the backend (the Router's replicas) and asks the model's
routing policy (policies.py) which replicas to try for each request. What it needs of a request travels with
the request's call, a Dispatch (replica/calls.py): its prefix `route` and the replicas to `avoid` (those that
failed it already); it writes down on the Dispatch which replica took it. It leaves out replicas that just
failed any request, prefers replicas that hold a request's LoRA adapter, and puts each backend's count of
running replicas on the process's RoutingBoard (routing_board.py), for the Router's choice of backend, with
the replicas whose KV cache events the board follows (kv_aware).
Requests are matched to replicas exactly (no FIFO hand-over), so an affinity choice is never given to
another request. The Forwarder asks it for the same choice ahead of the call (`pick`), to send a whole request
there over the chunk channel, or to pin a call there (`pin`: a stream starts there over the chunk channel),
which is routed there first.

The board is reached through its module (`routing_board.BOARD`): Serve ships this class to each handle's
process with the globals it names, and a module is imported there, not copied.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from raystack.config import Routing
from raystack.replica.calls import Dispatch
from raystack.router import policies, routing_board


def call_of(pending_request: PendingRequest | None) -> Dispatch | None:
    """The Dispatch the Forwarder sent (LLMServer.generate's one argument); None when Serve asks for a ranking
    without a request."""
    args = pending_request.args if pending_request is not None else ()
    return args[0] if args and isinstance(args[0], Dispatch) else None


class BackendRequestRouter(RequestRouter):
    def initialize_state(self, **routing: Any) -> None:
        """`routing`: the model's routing settings (config.Routing, dumped), as build_backend passes them."""
        self.routing = Routing.model_validate(routing)
        self.policy = policies.policy_for(self.routing, routing_board.BOARD)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        board = routing_board.BOARD
        board.running[self._deployment_id.name] = len(replicas)
        board.routers[self._deployment_id.name] = self
        board.failing.keep_only({r.replica_id.unique_id for r in replicas})
        # Each replica's metadata says where its engine publishes its KV cache events, if it does.
        board.kv.follow(self._deployment_id.name,
                        [(r.replica_id.unique_id, r.replica_metadata.get("kv_events")) for r in replicas])

    def in_flight(self, replica: RunningReplica) -> int:
        """Its queue as Serve last knew it, and what this process sent it that Serve does not count (yet): direct
        answers (replica/direct_answers.py), calls pinned there that Serve has not routed (routing_board.Ahead)."""
        return ((self.replica_queue_len_cache.get(replica.replica_id) or 0)
                + routing_board.BOARD.ahead.get(replica.replica_id.unique_id))

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        call = call_of(pending_request)
        usable, ranks = self.ranks(candidate_replicas, call)
        adapter = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if adapter:
            ranks.insert(0, self.holding(adapter, usable))
        pinned = call.pinned if call is not None else None  # picked (and maybe started) there: first, if usable
        if pinned:
            ranks.insert(0, [r for r in usable if r.replica_id.unique_id == pinned])
        return [rank for rank in ranks if rank]

    def ranks(self, candidates: list[RunningReplica], call: Dispatch | None
              ) -> tuple[list[RunningReplica], list[list[RunningReplica]]]:
        """The candidates `call` may go to, and the policy's ranks of them."""
        # Not a replica that just failed: this request's earlier tries', or any request's lately.
        usable = routing_board.BOARD.failing.usable(candidates, call.avoid if call else ())
        return usable, self.policy.choose_replicas(self._deployment_id.name, usable, call.route if call else (),
                                                   self.in_flight)

    def pick(self, call: Dispatch) -> str | None:
        """The replica `call` would go to now, chosen as Serve chooses from choose_replicas' ranks (the first
        rank's replica with the shortest known queue below its max_ongoing_requests: request_router.py,
        _select_from_candidate_replicas), or None if no ranked replica has room."""
        for rank in self.ranks(self._replicas_list, call)[1]:  # the candidates Serve passes choose_replicas
            room = [r for r in rank if self.in_flight(r) < r.max_ongoing_requests]
            if room:
                return min(room, key=self.in_flight).replica_id.unique_id
        return None

    def pin(self, call: Dispatch) -> str | None:
        """Pin `call` to the replica it would go to now (`pick`), counted there until Serve routes it; or None."""
        replica = self.pick(call)
        if replica is not None:
            routing_board.BOARD.ahead.pin(call, replica)
        return replica

    def holding(self, adapter: str, replicas: list[RunningReplica]) -> list[RunningReplica]:
        """The replicas that hold LoRA `adapter` loaded (Serve's multiplexed model ids, which replicas report)
        and carry at most affinity_slack requests more than the least loaded: an adapter's requests stay
        where it is loaded without piling onto one replica."""
        holders = [r for r in replicas if adapter in r.multiplexed_model_ids]
        least = min(map(self.in_flight, replicas), default=0)
        return [r for r in holders if self.in_flight(r) <= least + self.routing.affinity_slack]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        call = call_of(pending_request)
        if call is not None:
            self.routed(call, replica_id.unique_id)

    def routed(self, call: Dispatch, replica: str) -> None:
        """`replica` took `call` (through Serve, or directly: forwarding.py)."""
        call.replica = replica
        routing_board.BOARD.ahead.settle(call)  # Serve counts it in its replica's queue from now on
        call.cached_tokens = self.policy.cached_tokens(self._deployment_id.name, replica, call.route)
        self.policy.routed(self._deployment_id.name, replica, call.route)
