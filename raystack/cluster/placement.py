"""Placement: the NPUs a backend's replica needs, and whether this cluster can host it.

A replica of a `device: npu` backend is a placement group of tensor x pipeline `{NPU: 1}` bundles (the
replica's CPUs in bundle 0), on nodes whose labels (`raystack start`) say the chip, the HBM and the engine
fit. Ray would leave a replica that can never fit pending forever without a word; these checks say it
plainly instead, in `serve run` and `raystack status`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from raystack.cluster.chips import (
    ACCELERATOR_LABEL,
    FAMILY_LABEL,
    HBM_LABEL,
    HBM_TIERS_GIB,
    family_of,
    parse_chip,
    tiers_at_least,
)
from raystack.config import Backend, Model
from raystack.models import sources
from raystack.engines.base import NodeSoftware, Placement, node_software


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
    """What one replica needs: NPUs, on nodes whose labels match `selector`, and whether all on one node."""

    npus: float
    selector: dict[str, str] = field(default_factory=dict)
    one_node: bool = False
    detail: str = ""  # e.g. "tensor 4 x pipeline 2"
    per_node: float = 0  # STRICT_SPREAD: this many NPUs on each of npus / per_node distinct nodes

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
    series raystack runs on (engines that need nothing particular of a node run on any)."""
    selector = {}
    wanted = backend.accelerator.type
    if wanted:
        family = family_of(wanted)
        selector = {FAMILY_LABEL: family} if family else {ACCELERATOR_LABEL: parse_chip(wanted).model}
    if min_hbm_gib:
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
    p = backend.parallel
    return replace(demand, detail=f"tensor {p.tensor} x pipeline {p.pipeline}") if demand.npus else demand


def bundles_demand(bundles: list[dict[str, float]], strategy: str = "PACK",
                   selector: dict[str, str] | None = None) -> NPUDemand:
    """What one replica needs, from what Ray is asked for: placement-group bundles or actor resources, and
    the label selector. STRICT_SPREAD puts each bundle on a node of its own."""
    npus = [b.get("NPU", 0) for b in bundles]
    spread = strategy == "STRICT_SPREAD" and len(bundles) > 1
    return NPUDemand(sum(npus), dict(selector or {}), strategy == "STRICT_PACK" or len(bundles) == 1,
                     per_node=max(npus) if spread else 0)


HBMNeeds = dict[tuple[str, str], float]  # (model, backend) -> GiB of HBM each NPU of a replica needs


def hbm_needs(models: list[Model], cache_dir: Path, fetch: bool = True,
              report: Callable[[str], None] = print) -> HBMNeeds:
    """The HBM each NPU of every NPU backend's replica needs, by `raystack estimate`'s rule for the backend's
    parallelism, context and engine memory share. A model whose config.json cannot be read (not fetched
    with `fetch` False, offline hub, not a decoder the estimate knows) gets no HBM requirement, said."""
    from raystack.cluster.estimate import EstimateError, min_hbm_gib

    needs: HBMNeeds = {}
    for model in models:
        npu = [b for b in model.backends if b.device == "npu" and b.loads_model]
        if not npu:
            continue
        try:
            model_config = sources.model_config(model.source, cache_dir, progress=report, fetch=fetch)
            for b in npu:
                needs[model.name, b.name] = min_hbm_gib(
                    model_config, b.parallel.tensor, b.parallel.pipeline, b.max_model_len,
                    b.engine_args.get("dtype"), b.spec.memory_fraction(b))
        except (sources.ModelSourceError, EstimateError) as err:
            report(f"raystack: {model.name}: no HBM requirement for its NPU replicas ({err})")
    return needs


def fit_problem(name: str, demand: NPUDemand, nodes: list[NodeCapacity]) -> tuple[str | None, str | None]:
    """(why the cluster can never host one replica, why it cannot host one right now); None if fine."""
    need = demand.npus
    if not need:
        return None, None
    missing_engine = _engine_missing(name, demand, nodes)
    if missing_engine:
        return missing_engine, None
    matching = [n for n in nodes if n.qualifies(demand.selector)]
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
    kind = demand.kind()
    have = f"the cluster has {sum(n.npu_total for n in matching):g} {kind} on {len(matching)} node(s)"
    if best_total < need:
        missing = demand.unlabelled(nodes)
        fix = (f"No NPU node carries the label{'s' * (len(missing) > 1)} {', '.join(missing)}: start NPU nodes "
               f"with `raystack start`, which sets them." if missing else
               "Add NPU nodes (`raystack start --address ...`), lower parallelism, or change accelerator.type.")
        never = (
            f"backend {name} needs {need:g} {kind} per replica {where}"
            + (f" ({demand.detail})" if demand.detail else "")
            + f", but {have}"
            + (f" (largest node: {best_total:g})" if demand.one_node else "")
            + f". {fix}"
        )
        return never, None
    if best_free < need:
        return None, (
            f"backend {name} needs {need:g} {kind} per replica {where}; only {best_free:g} are free now, "
            f"so a new replica waits until other replicas release theirs"
        )
    return None, None

