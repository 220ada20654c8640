"""The one way tests start Ray Serve: a fresh Ray cluster of their own (never one a developer or
RAY_ADDRESS points at), Serve's HTTP on a free loopback port, and everything shut down afterwards.

Without `nodes`, a local single-node Ray; with `nodes` (a list, maybe empty), a cluster simulated on this
machine (ray.cluster_utils.Cluster): a head, then one node per entry of `nodes` (Cluster.add_node's
arguments), and more may join it at `cluster.address`.
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass
from typing import Any, Iterator

import ray
from ray import serve
from ray.cluster_utils import Cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServeCluster:
    url: str  # Serve's HTTP base URL
    cluster: Cluster | None  # the simulated nodes, when there are any


@contextlib.contextmanager
def serve_cluster(nodes: list[dict[str, Any]] | None = None, head: dict[str, Any] | None = None,
                  **ray_args: Any) -> Iterator[ServeCluster]:
    """`head`: the head node's arguments with `nodes` (default: 1 CPU, no dashboard); without `nodes`,
    ray.init's `ray_args` (default: 2 CPUs, no dashboard)."""
    cluster = None
    if nodes is not None:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                                **(head or {})})
        for node in nodes:
            cluster.add_node(**node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="ERROR")
    else:
        ray.init(**{"address": "local", "num_cpus": 2, "include_dashboard": False, "logging_level": "ERROR",
                    **ray_args})
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield ServeCluster(f"http://127.0.0.1:{port}", cluster)
    finally:
        serve.shutdown()
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
