"""The checkpoint on every node a replica's ranks run on, at the one path its engine is given.

A replica whose ranks span nodes (vLLM tensor or pipeline ranks in bundles on other nodes, MindIE's
per-node daemons) needs the weights on each of those nodes at the same path: vLLM gives every worker one
`model` path, MindIE every daemon one modelWeightPath. Before its engine starts, the replica prepares
the model on its own node, then runs one small task on each other node of its placement group that
does the same there, into the same cache path: a hub model is downloaded into that node's cache under a
file lock (so two replicas on one node, a vLLM and a MindIE one say, share one download) and verified
against the manifest of the finished download; an embedded model is converted. A local path, or a cache
the config declares shared (`cache_shared: true`, one filesystem mounted on every node), is not copied:
each node must see it, complete, or the replica fails naming the node and what to do.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from raystack.models import sources

logger = logging.getLogger("ray.serve")


def other_nodes() -> list[str]:
    """The ids of the nodes this process's placement group has bundles on, besides its own."""
    import ray

    group = ray.util.get_current_placement_group()
    if group is None:
        return []
    here = ray.get_runtime_context().get_node_id()
    placed = ray.util.placement_group_table(group).get("bundles_to_node_id", {})
    return sorted({node for node in placed.values() if node and node != here})


def prepare_here(source: str, cache_dir: str, shared: bool, expected: str | None = None,
                 progress: Callable[[str], None] = logger.info) -> str:
    """The checkpoint on this node: prepared, or (a local path; with `shared`, the cache another node
    filled) checked to be there; raises ModelSourceError naming this node when it cannot be, or when its
    path differs from `expected`."""
    import ray

    where = f"node {ray.util.get_node_ip_address()}"
    if shared or sources.parse_source(source).kind == "local":
        path = sources.locate(source, Path(cache_dir))
        if path is None:
            what = "the shared cache" if shared else "the local checkpoint"
            raise sources.ModelSourceError(
                f"{where} does not see {source} complete in {what} ({cache_dir}): every node a replica spans "
                f"needs it at the same path. Mount the shared storage there, or copy the checkpoint there"
                + (", or drop cache_shared to let each node download it" if shared else ""))
    else:
        path = sources.resolve(source, Path(cache_dir), progress=progress)
    if expected is not None and str(path) != expected:
        raise sources.ModelSourceError(f"{where} prepared {source} at {path}, not at {expected} like the replica's "
                                       f"node: the engine's ranks need one path; use one cache_dir on every node")
    return str(path)


def prepare_on_every_node(source: str, cache_dir: str, shared: bool,
                          progress: Callable[[str], None] = logger.info) -> Path:
    """The checkpoint here and on every other node of this replica's placement group; its path."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    path = prepare_here(source, cache_dir, False, progress=progress)  # a shared cache is filled from here
    nodes = other_nodes()
    if nodes:
        progress(f"{source}: preparing it on {len(nodes)} more node(s) of this replica")
        task = ray.remote(num_cpus=0, max_retries=0)(prepare_here)
        try:
            ray.get([task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                     .remote(source, cache_dir, shared, path) for node in nodes])
        except ray.exceptions.RayTaskError as err:  # its own words, not a remote traceback
            raise sources.ModelSourceError(str(err.cause) if err.cause else str(err)) from None
    return Path(path)
