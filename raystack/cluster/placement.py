"""Placement: the NPUs a backend's replica needs, and whether this cluster can host it.

A replica of a `device: npu` backend is a placement group of tensor x pipeline `{NPU: 1}` bundles (the
replica's CPUs in bundle 0). Ray would leave a replica that can never fit pending forever without a
word; these checks say it plainly instead, in `serve run` and `raystack status`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raystack.config import Backend


@dataclass
class NodeCapacity:
    node_id: str
    address: str
    npu_total: float
    npu_free: float
    accelerator_types: set[str] = field(default_factory=set)
    labels: dict[str, str] = field(default_factory=dict)

    def has_type(self, chip_type: str | None) -> bool:
        return chip_type is None or chip_type in self.accelerator_types


def cluster_capacity() -> list[NodeCapacity]:
    """NPU totals and free counts of every alive node of the connected Ray cluster."""
    import ray

    free_by_node = _available_per_node()
    nodes = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        total = n.get("Resources", {})
        types = {k.split(":", 1)[1] for k in total if k.startswith("accelerator_type:")}
        nodes.append(
            NodeCapacity(
                node_id=n["NodeID"],
                address=n.get("NodeManagerAddress", "?"),
                npu_total=total.get("NPU", 0),
                npu_free=free_by_node.get(n["NodeID"], {}).get("NPU", 0),
                accelerator_types=types,
                labels=dict(n.get("Labels") or {}),
            )
        )
    return nodes


def _available_per_node() -> dict[str, dict[str, float]]:
    # ray.available_resources() only sums the cluster; this DeveloperAPI gives it per node.
    from ray._private.state import available_resources_per_node

    return available_resources_per_node()


@dataclass(frozen=True)
class NPUDemand:
    """What one replica needs: NPUs, of which chip type, and whether all on one node."""

    npus: float
    chip_type: str | None = None
    one_node: bool = False
    detail: str = ""  # e.g. "tensor 4 x pipeline 2"
    per_node: float = 0  # MindIE: this many NPUs on each of npus / per_node distinct nodes


def backend_demand(backend: Backend) -> NPUDemand:
    if backend.device != "npu":
        return NPUDemand(0)
    p = backend.parallel
    detail = f"tensor {p.tensor} x pipeline {p.pipeline}"
    if backend.engine == "mindie":  # one daemon per node over tensor NPUs (app.mindie_placement)
        return NPUDemand(p.world_size, backend.accelerator.type, p.pipeline == 1, detail, per_node=p.tensor)
    return NPUDemand(p.world_size, backend.accelerator.type, backend.placement == "strict_pack", detail)


def bundles_demand(bundles: list[dict[str, float]], strategy: str = "PACK") -> NPUDemand:
    """The same, read back from what Ray was asked for: placement-group bundles or actor resources."""
    types = {k.split(":", 1)[1] for b in bundles for k in b if k.startswith("accelerator_type:")}
    return NPUDemand(sum(b.get("NPU", 0) for b in bundles), next(iter(sorted(types)), None),
                     strategy == "STRICT_PACK")


def fit_problem(name: str, demand: NPUDemand, nodes: list[NodeCapacity]) -> tuple[str | None, str | None]:
    """(why the cluster can never host one replica, why it cannot host one right now); None if fine."""
    need = demand.npus
    if not need:
        return None, None
    matching = [n for n in nodes if n.has_type(demand.chip_type)]
    kind = f"{demand.chip_type} " if demand.chip_type else ""
    if demand.per_node and not demand.one_node:
        nodes = round(need / demand.per_node)
        # Capacity of the `nodes` best nodes, counting only nodes that can hold a whole share.
        best_total = demand.per_node * min(nodes, sum(n.npu_total >= demand.per_node for n in matching))
        best_free = demand.per_node * min(nodes, sum(n.npu_free >= demand.per_node for n in matching))
        where = f"as {demand.per_node:g} on each of {nodes} nodes"
    elif demand.one_node:
        best_total = max((n.npu_total for n in matching), default=0)
        best_free = max((n.npu_free for n in matching), default=0)
        where = "on one node (strict_pack)"
    else:
        best_total = sum(n.npu_total for n in matching)
        best_free = sum(n.npu_free for n in matching)
        where = "in the cluster"
    have = f"the cluster has {sum(n.npu_total for n in matching):g} {kind}NPUs on {len(matching)} node(s)"
    if best_total < need:
        never = (
            f"backend {name} needs {need:g} {kind}NPUs per replica {where}"
            + (f" ({demand.detail})" if demand.detail else "")
            + f", but {have}"
            + (f" (largest node: {best_total:g})" if demand.one_node else "")
            + ". Add NPU nodes (`raystack start --address ...`), lower parallelism, or change accelerator.type."
        )
        return never, None
    if best_free < need:
        return None, (
            f"backend {name} needs {need:g} {kind}NPUs per replica {where}; only {best_free:g} are free now, "
            f"so a new replica waits until other replicas release theirs"
        )
    return None, None


def ray_strategy(backend: Backend) -> str:
    return {"pack": "PACK", "strict_pack": "STRICT_PACK", "spread": "SPREAD"}[backend.placement]
