"""`raystack plan CONFIG [--nodes SPEC]`: what each backend's replicas will run on an NPU cluster, without one.

For every backend: the NPUs and nodes a replica reserves (Ray bundles, strategy, the label selector its
NPUs must satisfy, the HBM per NPU it needs and where that figure came from: cluster/hbm_need.py), whether
the given nodes can host it, the replica's environment, and what its engine runs (vLLM's engine arguments;
MindIE's config.json, environment and, over several nodes, the rank table), its routing policy, and under
kv_aware whether its engine publishes the KV cache events routers match prompts against. Operators review it
before `serve run`. The nodes are imagined from SPEC, `COUNTxNPUS[:CHIP][+ENGINE...]` joined by commas, as
`raystack start` would register them: +ENGINE (+vllm, +mindie) is an engine the node runs, at the series
the README installs; a group without one runs no engine. The default is one node of each engine:
1x8:Ascend910B3+vllm,1x8:Ascend910B3+mindie.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from raystack.cluster.chips import ACCELERATOR_LABEL, FAMILY_LABEL, HBM_LABEL, hbm_tier, parse_chip
from raystack.cluster.hbm_need import hbm_needs, unknown_needs
from raystack.cluster.placement import NodeCapacity, backend_demand, fit_problem, node_needs, ray_placement
from raystack.config import ConfigError, RaystackConfig, deployment_name
from raystack.engines.base import PlannedNode, node_software
from raystack.models import sources
from raystack.process import SERVE_FAST_PATH_ENV

DEFAULT_NODES = "1x8:Ascend910B3+vllm,1x8:Ascend910B3+mindie"
_GROUP = re.compile(r"(\d+)x(\d+)(?::([^+\s]+))?((?:\+[\w-]+)*)")


def planned_nodes(spec: str) -> list[tuple[PlannedNode, NodeCapacity]]:
    """Nodes 10.0.0.1, 10.0.0.2, ... as SPEC describes them, with the labels `raystack start` gives them."""
    nodes = []
    software = node_software()
    for group in spec.split(","):
        match = _GROUP.fullmatch(group.strip())
        chip = parse_chip(match[3] or "Ascend910B3") if match else None
        if match is None or chip is None:
            raise ConfigError(f"--nodes {spec!r}: each group is COUNTxNPUS[:CHIP][+ENGINE...], e.g. "
                              f"2x8:Ascend910B3+vllm or 1x16:Ascend910_9392+mindie")
        engines = [e for e in match[4].split("+") if e]
        unknown = [e for e in engines if e not in software]
        if unknown:
            raise ConfigError(f"--nodes {spec!r}: {', '.join(unknown)} is not an engine a node is labelled with; "
                              f"+ENGINE is one of {', '.join('+' + e for e in software)}")
        labels = {FAMILY_LABEL: chip.family, **({ACCELERATOR_LABEL: chip.model} if chip.model else {}),
                  **({HBM_LABEL: str(hbm_tier(chip.hbm_gib))} if chip.hbm_gib else {}),
                  **{software[e].label: software[e].planned for e in engines}}
        for _ in range(int(match[1])):
            ip = f"10.0.0.{len(nodes) + 1}"
            npus = int(match[2])
            nodes.append((PlannedNode(ip, tuple(range(npus)), chip.family), NodeCapacity(ip, ip, npus, npus, labels)))
    return nodes


def plan(config: RaystackConfig, spec: str = DEFAULT_NODES) -> dict[str, Any]:
    nodes = planned_nodes(spec)
    cache = sources.cache_root(config.cache_dir)
    notes: list[str] = []
    hbm = hbm_needs(config.models, cache, report=notes.append)
    out: dict[str, Any] = {"nodes": {n.ip: {"npus": len(n.npu_ids), **c.labels} for n, c in nodes}, "backends": {}}
    if notes:
        out["notes"] = notes
    unknown = unknown_needs(config.models, hbm)
    if unknown:  # what `serve run` would refuse: said apart, and the CLI exits 1
        out["unknown_hbm_needs"] = [line.strip() for line in unknown]
    for model in config.models:
        for backend in model.backends:
            name = f"{model.name}@{backend.name}"
            need = hbm.get((model.name, backend.name))
            gib = need.gib if need else None
            placement = ray_placement(backend, gib)
            entry: dict[str, Any] = {
                "engine": backend.engine, "device": backend.device,
                "deployment": deployment_name(model.name, backend.name),
                "replicas": f"{backend.autoscaling.min_replicas}-{backend.autoscaling.max_replicas}",
                "replica_cpus": backend.replica_cpus, "needs": node_needs(backend),
                "routing": model.routing.policy,
            }
            if model.routing.policy == "kv_aware":
                entry["kv_events"] = ("published: routers match each prompt against its replicas' KV caches"
                                      if backend.spec.publishes_kv_events else
                                      "none (the engine publishes none): its replicas are chosen by load")
            if backend.device == "npu":
                never, _ = fit_problem(name, backend_demand(backend, gib), [c for _, c in nodes])
                entry["placement"] = {
                    "replica": placement.replica, "bundles": list(placement.bundles),
                    "strategy": placement.strategy if placement.bundles else None,
                    "label_selector": placement.label_selector,
                    "hbm_per_npu_gib": round(gib, 1) if gib is not None else "unknown",
                    "hbm_need_from": need.source if need else None,
                    "fits": never or ("yes" if gib is not None or not backend.loads_model
                                      else "unknown: the HBM need is unknown (hbm_need_from)"),
                }
            entry["env"] = {**SERVE_FAST_PATH_ENV, **backend.env}
            if backend.loads_model:
                path = sources.target_dir(model.source, cache)
                entry["model_path"] = str(path)
                landing = _landing(backend, [n for n, c in nodes if c.qualifies(placement.label_selector)])
                entry.update(backend.spec.plan(model.name, Path(path), backend, landing))
            out["backends"][name] = entry
    return out


def _landing(backend: Any, qualifying: list[PlannedNode]) -> list[PlannedNode]:
    """The nodes one replica lands on, as far as a plan can tell: the first qualifying ones it needs."""
    if backend.device != "npu":
        return [PlannedNode("127.0.0.1", ())]
    nodes = max(1, backend.parallel.pipeline)
    if len(qualifying) >= nodes:
        return qualifying[:nodes]
    # Too few qualify (the plan says so under `fits`): still show what it would run, on imagined nodes.
    return [PlannedNode(f"10.0.0.{i + 1}", tuple(range(backend.parallel.tensor))) for i in range(nodes)]
