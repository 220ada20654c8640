"""MindIENode: the Ray actor that runs a multi-node MindIE replica's daemon on each further node.

The replica (on the first node of its placement group) creates one per further bundle. Each tells where
it landed (node IP, its NPUs and their NIC addresses), then runs that node's daemon from the shared rank
table. It is owned by the replica: when the replica goes, Ray takes its node actors down, and each
daemon's process guard takes the daemon's process group with it.
"""

from __future__ import annotations

import dataclasses

from raystack.engines.mindie.settings import MindIESettings
from raystack.engines.mindie.config import MindIEPlan
from raystack.engines.mindie.daemon import MindIEDaemon
from raystack.engines.mindie.ranktable import NodeDevices, device_ip


def this_node() -> NodeDevices:
    """This process's node IP and the NPUs Ray granted it, each with its NIC address."""
    import ray

    ids = sorted(int(i) for i in ray.get_runtime_context().get_accelerator_ids().get("NPU", []))
    return NodeDevices(ray.util.get_node_ip_address(), tuple((i, device_ip(i)) for i in ids))


class MindIENode:
    def __init__(self, settings: dict, backend_env: dict[str, str], name: str):
        self.settings = MindIESettings.model_validate(settings)
        self.backend_env = backend_env
        self.name = name
        self.node = this_node()
        self.daemon: MindIEDaemon | None = None

    def where(self) -> NodeDevices:
        return self.node

    async def start(self, plan: MindIEPlan, ranktable: dict, kill_grace_s: float) -> None:
        """This node's daemon: the replica's plan with this node's NPUs and IP; it serves no HTTP."""
        mine = dataclasses.replace(plan, npu_ids=[i for i, _ in self.node.devices], ip=self.node.ip)
        self.daemon = MindIEDaemon(mine, self.settings, self.name, self.backend_env, ranktable=ranktable,
                                   serves_http=False)
        await self.daemon.start(None, kill_grace_s)

    def exited(self) -> str | None:
        return self.daemon.exited() if self.daemon else None

    async def stop(self, kill_grace_s: float) -> None:
        if self.daemon is not None:
            await self.daemon.stop(None, 0, kill_grace_s)
            self.daemon = None
