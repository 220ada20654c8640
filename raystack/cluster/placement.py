"""Placement: the NPUs a backend's replica needs, and whether this cluster can host it.

A replica of a `device: npu` backend is a placement group of tensor x pipeline `{NPU: 1}` bundles (the
replica's CPUs in bundle 0): all on one node with pipeline 1, over nodes in whole tensor-parallel groups
beyond (engines/base.py rank_per_npu); MindIE's are one bundle per node. They go to nodes whose labels
(`raystack start`) say the chip, the HBM and the engine fit. Ray would leave a replica that can never fit
pending forever without a word; these checks say it plainly instead, in `serve run`, `raystack plan` and
`raystack status`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from raystack.cluster.chips import (
    ACCELERATOR_LABEL,
    FAMILY_LABEL,
    HBM_LABEL,
    HBM_TIERS_GIB,
    family_of,
    parse_chip,
    tiers_at_least,
)
from raystack.config import Backend
from raystack.engines.base import NodeSoftware, Placement, Strategy, node_software


@dataclass
class NodeCapacity:
    node_id: str
    address: str
    npu_total: float
    npu_free: float
    labels: dict[str, str] = field(default_factory=dict)

    def qualifies(self, selector: dict[str, str]) -> bool:
        return matches(selector, self.labels)


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether node `labels` satisfy a label selector of the forms raystack writes: `value` and `in(a,b)`
    (Ray's own syntax: every condition must hold; a node without the label does not match)."""
    for key, condition in selector.items():
        value = labels.get(key)
        if condition.startswith("in(") and condition.endswith(")"):
            if value not in condition[3:-1].split(","):
                return False
        elif value != condition:
            return False
    return True


def cluster_capacity() -> list[NodeCapacity]:
    """NPU totals and free counts of every alive node of the connected Ray cluster."""
    import ray

    free_by_node = _available_per_node()
    nodes = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        nodes.append(
            NodeCapacity(
                node_id=n["NodeID"],
                address=n.get("NodeManagerAddress", "?"),
                npu_total=n.get("Resources", {}).get("NPU", 0),
                npu_free=free_by_node.get(n["NodeID"], {}).get("NPU", 0),
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
    """What one replica needs: `npus` NPUs on nodes whose labels match `selector`, in groups of `group` NPUs
    that must each be on one node (0: anywhere; `npus`: all on one node), with `distinct_nodes` each group
    on a node of its own (STRICT_SPREAD)."""

    npus: float
    selector: dict[str, str] = field(default_factory=dict)
    group: float = 0
    distinct_nodes: bool = False
    detail: str = ""  # e.g. "tensor 4 x pipeline 2"

    @property
    def one_node(self) -> bool:
        return bool(self.npus) and self.group >= self.npus

    def room(self, npus_per_node: list[float]) -> float:
        """How many of its NPUs nodes with these NPU counts can hold, whole groups only."""
        if not self.group:
            return sum(npus_per_node)
        groups_per_node = [n // self.group for n in npus_per_node]
        if self.distinct_nodes:
            groups_per_node = [min(g, 1) for g in groups_per_node]
        return min(sum(groups_per_node) * self.group, self.npus)

    def where(self) -> str:
        """How its NPUs must lie, in words."""
        if self.one_node:
            return "on one node"
        groups = round(self.npus / self.group) if self.group else 0
        if self.distinct_nodes:
            return f"as {self.group:g} on each of {groups} nodes"
        if self.group > 1:
            return f"as {groups} tensor-parallel groups of {self.group:g}, each group on one node"
        return "in the cluster"

    def kind(self) -> str:
        """The NPUs it needs, in words: "Ascend910B NPUs with MindIE and at least 48 GiB HBM each"."""
        chip = self.selector.get(FAMILY_LABEL) or self.selector.get(ACCELERATOR_LABEL) or ""
        hbm = self.selector.get(HBM_LABEL, "")
        least = hbm[3:-1].split(",")[0] if hbm.startswith("in(") else hbm
        engines = " and ".join(s.name for s in self.software())
        return (f"{chip} NPUs".strip() + (f" with {engines}" if engines else "")
                + (f"{' and' if engines else ' with'} at least {least} GiB HBM each" if least else ""))

    def software(self) -> list[NodeSoftware]:
        """The engines whose nodes the selector asks for."""
        return [s for s in node_software().values() if s.label in self.selector]

    def unlabelled(self, nodes: list[NodeCapacity]) -> list[str]:
        """The labels the selector asks for that no NPU node carries (nodes not started by raystack start)."""
        npu_nodes = [n for n in nodes if n.npu_total]
        return [k for k in self.selector if npu_nodes and not any(k in n.labels for n in npu_nodes)]


def label_selector(backend: Backend, min_hbm_gib: float | None = None) -> dict[str, str]:
    """The node labels (set by `raystack start`, node.py) a replica's NPUs must be on: the family or model
    `accelerator.type` names, an HBM size of at least `min_hbm_gib` per NPU, and the engine's label in a
    series raystack runs on (engines that need nothing particular of a node run on any). A need every HBM
    size tier meets (the smallest tier, 8 GiB, or less) adds no condition: it would only turn away nodes
    without the label, whose NPUs all have that much."""
    selector = {}
    wanted = backend.accelerator.type
    if wanted:
        family = family_of(wanted)
        selector = {FAMILY_LABEL: family} if family else {ACCELERATOR_LABEL: parse_chip(wanted).model}
    if min_hbm_gib and min_hbm_gib > HBM_TIERS_GIB[0]:
        tiers = tiers_at_least(min_hbm_gib)
        selector[HBM_LABEL] = f"in({','.join(map(str, tiers))})" if tiers else f"in(over-{HBM_TIERS_GIB[-1]})"
    software = backend.spec.node_software
    if software:
        selector[software.label] = software.selector()
    return selector


def node_needs(backend: Backend) -> str:
    """The node a backend's replicas need, in words (`raystack plan`, `config check`)."""
    software = backend.spec.node_software
    if backend.device != "npu":
        return "any node (device: cpu)"
    return software.needs() if software else "any NPU node"


def engines_offered(labels: dict[str, str]) -> list[str]:
    """The engines a node's labels say it runs: ["vLLM-Ascend 0.23", "MindIE 2.1"]."""
    return [f"{s.name} {labels[s.label]}" for s in node_software().values() if s.label in labels]


def _engine_missing(name: str, demand: NPUDemand, nodes: list[NodeCapacity]) -> str | None:
    """Why no node can ever host the replica's engine, naming the nodes seen and what each offers."""
    for software in demand.software():
        wanted = {software.label: demand.selector[software.label]}
        if not any(matches(wanted, n.labels) for n in nodes):
            seen = "; ".join(f"{n.address}: {', '.join(engines_offered(n.labels)) or 'none'}" for n in nodes)
            return (f"backend {name} needs {software.needs()}, but no node offers it (nodes seen, with the engines "
                    f"they offer: {seen or 'none'}). To fix: {software.install}.")
    return None


def ray_placement(backend: Backend, min_hbm_gib: float | None = None) -> Placement:
    """What Ray reserves for one replica: its engine's placement, the replica's own CPUs in bundle 0, and the
    label selector its NPUs must satisfy. CPU replicas hold only their CPUs."""
    if backend.device != "npu":
        return Placement()
    placement = backend.spec.placement(backend)
    bundles = placement.bundles
    if bundles:  # bundle 0 holds the replica
        bundles = ({"CPU": backend.replica_cpus, **bundles[0]},) + bundles[1:]
    return replace(placement, bundles=bundles, label_selector=label_selector(backend, min_hbm_gib))


def backend_demand(backend: Backend, min_hbm_gib: float | None = None) -> NPUDemand:
    placement = ray_placement(backend, min_hbm_gib)
    demand = bundles_demand(list(placement.bundles) or [placement.replica], placement.strategy,
                            placement.label_selector)
    if placement.tensor_group > 1:  # per-rank bundles over nodes: whole tensor-parallel groups per node
        demand = replace(demand, group=placement.tensor_group)
    p = backend.parallel
    return replace(demand, detail=f"tensor {p.tensor} x pipeline {p.pipeline}") if demand.npus else demand


def bundles_demand(bundles: list[dict[str, float]], strategy: Strategy = "PACK",
                   selector: dict[str, str] | None = None) -> NPUDemand:
    """What one replica needs, from what Ray is asked for: placement-group bundles or actor resources, and
    the label selector. STRICT_PACK (or a single bundle) puts everything on one node, STRICT_SPREAD each
    bundle on a node of its own; PACK and SPREAD only need the NPUs somewhere."""
    npus = [b.get("NPU", 0) for b in bundles]
    if strategy == "STRICT_PACK" or len(bundles) == 1:
        return NPUDemand(sum(npus), dict(selector or {}), group=sum(npus))
    if strategy == "STRICT_SPREAD":
        return NPUDemand(sum(npus), dict(selector or {}), group=max(npus), distinct_nodes=True)
    return NPUDemand(sum(npus), dict(selector or {}))


def fit_problem(name: str, demand: NPUDemand, nodes: list[NodeCapacity]) -> tuple[str | None, str | None]:
    """(why the cluster can never host one replica, why it cannot host one right now); None if fine."""
    need = demand.npus
    if not need:
        return None, None
    missing_engine = _engine_missing(name, demand, nodes)
    if missing_engine:
        return missing_engine, None
    matching = [n for n in nodes if n.qualifies(demand.selector)]
    kind = demand.kind()
    have = f"the cluster has {sum(n.npu_total for n in matching):g} {kind} on {len(matching)} node(s)"
    if demand.room([n.npu_total for n in matching]) < need:
        missing = demand.unlabelled(nodes)
        fix = (f"No NPU node carries the label{'s' * (len(missing) > 1)} {', '.join(missing)}: start NPU nodes "
               f"with `raystack start`, which sets them." if missing else
               "Add NPU nodes (`raystack start --address ...`), lower parallelism, or change accelerator.type.")
        largest = max((n.npu_total for n in matching), default=0)
        never = (
            f"backend {name} needs {need:g} {kind} per replica {demand.where()}"
            + (f" ({demand.detail})" if demand.detail else "")
            + f", but {have}"
            + (f" (largest node: {largest:g})" if demand.group else "")
            + f". {fix}"
        )
        return never, None
    free = demand.room([n.npu_free for n in matching])
    if free < need:
        return None, (
            f"backend {name} needs {need:g} {kind} per replica {demand.where()}; only {free:g} are free "
            f"{'that way ' if demand.group else ''}now, so a new replica waits until other replicas release theirs"
        )
    return None, None
