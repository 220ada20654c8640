"""`raystack start`: join this node to a Ray cluster with its Ascend NPUs registered.

The NPUs register under Ray's own names: resource `NPU` (count of healthy chips), and, when the model is
known, resource `accelerator_type:<model>` and label `ray.io/accelerator-type` (e.g. Ascend910B3, as Ray
names it from acl). raystack adds two labels that replicas are placed by (placement.py): the chip family,
`raystack.io/npu-family` (Ascend910B for every A2 part, 910B4-1 and 910B2C included), and the HBM per NPU
in GiB, `raystack.io/npu-hbm-gib` (rounded up to chips.HBM_TIERS_GIB, so "at least N" is a label
selector). Each engine this node can run gets a label of its own, `raystack.io/engine-<name>`, valued with
the engine's version series (engines/base.py NodeSoftware: each engine says how it is found), so a
backend's NPU replicas go only to nodes of its engine. The environment vllm-ascend needs across nodes is
exported before `ray start`, so every Ray worker on this node (and so every engine worker) inherits it; so
does what an engine needs from the shell (CANN's, for vLLM Ascend), which `raystack start` does not set but
warns about when that engine is installed and it is missing.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
from dataclasses import dataclass, field
from pathlib import Path

from raystack.cluster.chips import ACCELERATOR_LABEL, FAMILY_LABEL, HBM_LABEL, hbm_tier
from raystack.cluster.npu import NodeNPUs
from raystack.engines.ascend_env import DEFAULT_ASCEND_HOME
from raystack.engines.base import Found, Where, node_software
from raystack.process import RAY_START_ENV, VISIBLE_NPUS_ENV



@dataclass
class StartPlan:
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)  # exported on top of the caller's environment
    notices: list[str] = field(default_factory=list)

    def render(self) -> str:
        lines = [f"export {k}={shlex.quote(v)}" for k, v in sorted(self.env.items())]
        return "\n".join(lines + [shlex.join(self.command)])


def default_route_interface(route_table: Path = Path("/proc/net/route")) -> str | None:
    """The interface of the default route, read from the kernel (no packet sent)."""
    try:
        for line in route_table.read_text().splitlines()[1:]:
            parts = line.split()
            if len(parts) > 2 and parts[1] == "00000000":
                return parts[0]
    except OSError:
        pass
    return None


def interface_to(host: str) -> str | None:
    """The interface this node uses to reach `host`: the kernel's route choice for a UDP socket
    (connect() on UDP picks a source address and sends nothing)."""
    import psutil

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((socket.gethostbyname(host), 9))
            local_ip = s.getsockname()[0]
    except OSError:
        return None
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == local_ip for a in addrs):
            return name
    return None


def interface_ipv4(ifname: str) -> str | None:
    import psutil

    for addr in psutil.net_if_addrs().get(ifname, []):
        if addr.family == socket.AF_INET:
            return addr.address
    return None


def detect_engines(where: Where | None = None) -> dict[str, Found]:
    """Engine name -> what this node has of it, for every engine that needs particular software on a node."""
    where = where or Where()
    return {name: software.detect(where) for name, software in node_software().items()}


def _engine_labels(engines: dict[str, Found], has_npus: bool, notices: list[str]) -> dict[str, str]:
    """The label of each engine found, and a notice for each: what was found, or why an NPU node has none."""
    software = node_software()
    labels = {}
    for name, found in engines.items():
        wanted = software[name]
        if found.series:
            labels[wanted.label] = found.series
            notices.append(f"{wanted.name}: {found.version} -> label {wanted.label}={found.series}")
            if found.warning:
                notices.append(f"warning: {wanted.name} is installed, but {found.warning}")
            if found.series not in wanted.series:
                notices.append(f"{wanted.name} {found.series} is not one raystack runs on "
                               f"({', '.join(wanted.series)}): no {name} replica will be placed on this node")
        elif found.version:
            notices.append(f"{wanted.name}: {found.version}, not usable: {found.note}")
    if has_npus and not any(software[name].label in labels for name in engines):
        looked = "; ".join(f"{software[name].name}: {found.note}" for name, found in engines.items() if found.note)
        notices.append(f"this NPU node has no inference engine{f' ({looked})' if looked else ''}, so no NPU replica "
                       f"of {' or '.join(s.name for s in software.values())} will be placed on it. Run raystack start "
                       f"in an engine's image, or where one is installed (README, \"On an Ascend NPU cluster\", "
                       f"step 1); --ascend-home says where the Ascend stack is, if not in {DEFAULT_ASCEND_HOME}.")
    return labels


def plan_start(
    npus: NodeNPUs,
    head: bool,
    address: str | None = None,
    port: int = 6379,
    ifname: str | None = None,
    extra_args: list[str] | None = None,
    ray_bin: str = "ray",
    engines: dict[str, Found] | None = None,
) -> StartPlan:
    """The `ray start` of this node; `engines`: what detect_engines found (default: nothing)."""
    if head == bool(address):
        raise ValueError("give exactly one of --head or --address HEAD:PORT")
    plan = StartPlan(command=[ray_bin, "start"], env=dict(RAY_START_ENV))
    if head:
        plan.command += ["--head", f"--port={port}", "--dashboard-host=127.0.0.1"]
    else:
        plan.command += [f"--address={address}"]

    resources: dict[str, float] = {}
    labels: dict[str, str] = {}
    if npus.count:
        resources["NPU"] = npus.count
        if npus.chip_type:  # the model as Ray itself registers it (acl.get_soc_name())
            resources[f"accelerator_type:{npus.chip_type}"] = 1
            labels[ACCELERATOR_LABEL] = npus.chip_type
        if npus.family:
            labels[FAMILY_LABEL] = npus.family
        if npus.hbm_gib_per_npu:
            labels[HBM_LABEL] = str(hbm_tier(npus.hbm_gib_per_npu))
        plan.env[VISIBLE_NPUS_ENV] = npus.visible_devices()
        # vLLM's Ray executor sets each worker's visible devices itself; Ray must not narrow them.
        plan.env["RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES"] = "1"
        plan.notices.append(
            f"{npus.count} x {npus.chip_type or npus.family or 'NPU'} registered (devices {npus.visible_devices()}, "
            f"{npus.hbm_gib_per_npu or '?'} GiB HBM each; found via {npus.source})"
        )
    else:
        # Say so: a node without NPUs still runs routers and CPU work, never an NPU engine.
        resources["NPU"] = 0
        plan.notices.append(
            "no Ascend NPU found on this node: it joins as a CPU-only node (routers, CPU backends). "
            "Use --npus N --npu-type T to simulate NPUs."
        )
    for chip, reason in npus.excluded:
        plan.notices.append(f"left out NPU {chip.npu_id} chip {chip.chip_id}: {reason}")
    plan.notices += npus.notes
    labels.update(_engine_labels(engines or {}, bool(npus.count), plan.notices))

    iface = ifname or (interface_to(address.rsplit(":", 1)[0]) if address else default_route_interface())
    if iface:
        ip = interface_ipv4(iface)
        plan.env.update({"GLOO_SOCKET_IFNAME": iface, "TP_SOCKET_IFNAME": iface})
        if ip:
            plan.env["HCCL_IF_IP"] = ip
            plan.command.append(f"--node-ip-address={ip}")
        else:
            plan.notices.append(f"interface {iface} has no IPv4 address; HCCL_IF_IP not set")
    else:
        plan.notices.append("could not tell which interface reaches the head; pass --ifname")

    plan.command.append("--resources=" + json.dumps(resources, separators=(",", ":")))
    if labels:
        plan.command.append("--labels=" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())))
    plan.command += extra_args or []
    return plan


def run(plan: StartPlan) -> int:
    import subprocess

    return subprocess.call(plan.command, env={**os.environ, **plan.env})

