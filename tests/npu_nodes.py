"""NPU nodes as `raystack start` makes them, for tests that simulate a cluster: the resources, labels and
environment of raystack.cluster.node.plan_start for given chips, with the engines its detection finds
(engines/base.py: node_software) in stand-in installations. No vllm-ascend can be installed here (it needs
CANN), so `vllm_ascend_site` lays out what its wheel and vLLM's would leave in site-packages: their
dist-info folders, as importlib.metadata reads them (vllm-ascend 0.23.0.post1 and vLLM 0.23.0+empty, the
versions of vllm-ascend's v0.23.0.post1 image); MindIE's stand-in is tests/mindie_standin.py."""

from __future__ import annotations

import json
from pathlib import Path

from raystack.cluster.chips import parse_chip
from raystack.cluster.node import detect_engines, plan_start
from raystack.cluster.npu import NodeNPUs
from raystack.cluster.npu_smi import NPUChip
from raystack.engines.base import Found, Where

VLLM_ASCEND_VERSION, VLLM_VERSION = "0.23.0.post1", "0.23.0+empty"


def vllm_ascend_site(root: Path, plugin: str | None = VLLM_ASCEND_VERSION, vllm: str | None = VLLM_VERSION,
                     plugin_dist: str = "vllm_ascend") -> Path:
    """A site directory holding the metadata of vllm-ascend `plugin` (its vLLM platform entry point, as its
    setup.py declares it) and vLLM `vllm`; either may be None (not installed)."""
    site = root / "site-packages"
    site.mkdir(parents=True, exist_ok=True)
    if plugin:
        info = site / f"{plugin_dist}-{plugin}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {plugin_dist.replace('_', '-')}\nVersion: {plugin}\n")
        (info / "entry_points.txt").write_text("[vllm.platform_plugins]\nascend = vllm_ascend:register\n")
    if vllm:
        info = site / f"vllm-{vllm}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {vllm}\n")
    return site


def engines_at(python_site: Path | None = None, ascend_home: Path | None = None) -> dict[str, Found]:
    """What raystack start detects on a node whose Python path is `python_site` alone and whose Ascend home
    is `ascend_home` (None: one that does not exist)."""
    return detect_engines(Where(ascend_home=ascend_home or Path("/nonexistent/Ascend"),
                                python_path=(str(python_site),) if python_site else (), environ={}))


def npu_node_args(name: str, count: int, hbm_mb: int, critical: tuple[int, ...] = (),
                  engines: dict[str, Found] | None = None) -> dict:
    """What `raystack start` gives a node of `count` chips named `name` (npu-smi's table name) that runs
    `engines`: the resources, labels and environment of its plan, as Ray's Cluster.add_node takes them."""
    chips = [NPUChip(i, 0, i, name, "Critical" if i in critical else "OK", hbm_mb) for i in range(count)]
    healthy = [c for c in chips if c.health == "OK"]
    chip = parse_chip(name)
    npus = NodeNPUs(healthy, [(c, "health Critical") for c in chips if c not in healthy], chip.model,
                    hbm_mb / 1024, "test", [], chip.family)
    plan = plan_start(npus, head=True, ifname="lo", engines=engines)
    [resources] = [a for a in plan.command if a.startswith("--resources=")]
    [labels] = [a for a in plan.command if a.startswith("--labels=")]
    return {
        "num_cpus": 2,
        "resources": json.loads(resources.split("=", 1)[1]),
        "labels": dict(kv.split("=", 1) for kv in labels.split("=", 1)[1].split(",")),
        "env_vars": plan.env,  # the raylet's, so every worker of the node inherits it, as after raystack start
    }
