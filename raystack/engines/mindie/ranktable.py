"""The rank table of a MindIE replica that spans nodes, built from where Ray placed it.

MindIE's multi-node inference reads a JSON rank table (RANK_TABLE_FILE): every server (node) with its
devices, each device with its physical id, its NIC address (`hccn_tool -i N -ip -g`) and a global rank.
Ranks run over the nodes in placement-bundle order, then over each node's devices; the node holding
rank 0 is MindIE's master, the only one that takes requests. All values are strings, as MindIE requires.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

HCCN_TOOL_PATHS = ("/usr/local/Ascend/driver/tools/hccn_tool",)
HCCN_TIMEOUT_S = 10


class RankTableError(RuntimeError):
    pass


@dataclass(frozen=True)
class NodeDevices:
    """One node of the replica: its IP (Ray's node IP, which MindIE gets as MIES_CONTAINER_IP) and its
    NPUs as (physical id, device NIC IP)."""

    ip: str
    devices: tuple[tuple[int, str], ...]


def hccn_tool() -> str:
    found = shutil.which("hccn_tool") or next((p for p in HCCN_TOOL_PATHS if os.access(p, os.X_OK)), None)
    if not found:
        raise RankTableError("hccn_tool is not on PATH nor in /usr/local/Ascend/driver/tools: a multi-node MindIE "
                             "replica needs it to read each NPU's NIC address; install the Ascend driver tools")
    return found


def device_ip(npu_id: int, tool: str | None = None) -> str:
    """The NIC address of NPU `npu_id` on this node, as `hccn_tool -i N -ip -g` prints it (ipaddr:A.B.C.D)."""
    command = [tool or hccn_tool(), "-i", str(npu_id), "-ip", "-g"]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=HCCN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RankTableError(f"`{' '.join(command)}` did not answer within {HCCN_TIMEOUT_S} s") from None
    match = re.search(r"^\s*ipaddr\s*:\s*(\S+)", out.stdout, re.MULTILINE)
    if out.returncode != 0 or not match:
        raise RankTableError(
            f"`{' '.join(command)}` gave no ipaddr (exit {out.returncode}): {(out.stderr or out.stdout).strip()[:300]}. "
            f"Configure the NPU's NIC address (hccn_tool -i {npu_id} -ip -s ...)"
        )
    return match.group(1)


def render_ranktable(nodes: list[NodeDevices]) -> dict[str, Any]:
    if len(nodes) < 2:
        raise RankTableError("a rank table is for a replica on 2 nodes or more")
    if len({n.ip for n in nodes}) != len(nodes):
        raise RankTableError(f"two parts of one replica landed on the same node IP ({[n.ip for n in nodes]}); "
                             f"MindIE runs one daemon per node")
    if len({len(n.devices) for n in nodes}) != 1:
        raise RankTableError("every node of a MindIE replica must hold the same number of NPUs")
    servers = []
    rank = 0
    for node in nodes:
        devices = []
        for npu_id, nic_ip in sorted(node.devices):
            devices.append({"device_id": str(npu_id), "device_ip": nic_ip, "rank_id": str(rank)})
            rank += 1
        servers.append({"server_id": node.ip, "container_ip": node.ip, "device": devices})
    return {"version": "1.0", "server_count": str(len(servers)), "server_list": servers, "status": "completed"}
