"""Where a replica's ranks landed: vLLM's rank order over the replica's placement group, and whether a
tensor-parallel group was split over nodes.

A replica over several nodes has one `{NPU: 1}` bundle per rank, placed by Ray's PACK, which knows nothing
of tensor-parallel groups (engines/base.py rank_per_npu says why no strategy does better). vLLM 0.23
numbers its Ray workers in the order of `get_bundles_sorted_by_node` (v1/executor/ray_utils.py, used by
ray_executor_v2.py): the bundles holding an NPU, those on the driver's node (the replica's: EngineCore is
its subprocess) first, then by node id, each node's in bundle order. Its ranks run tensor-parallel
innermost, so tensor group g is ranks g*tensor .. (g+1)*tensor - 1. A group split over nodes would run its
all-reduce over the network on every layer: the replica refuses to start its engine on such a layout,
saying where Ray put what and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PlacedRank:
    rank: int
    bundle: int
    node_id: str
    node_ip: str


def ranks_in_vllm_order(npu_bundles: list[int], bundle_nodes: dict[int, str], node_ips: dict[str, str],
                        driver_node: str) -> list[PlacedRank]:
    """The ranks vLLM gives the bundles `npu_bundles` (indices, in bundle order) that Ray placed on
    `bundle_nodes` (index -> node id), as get_bundles_sorted_by_node sorts them (a stable sort)."""
    ordered = sorted(npu_bundles, key=lambda b: (bundle_nodes[b] != driver_node, bundle_nodes[b]))
    return [PlacedRank(rank, b, bundle_nodes[b], node_ips.get(bundle_nodes[b], bundle_nodes[b][:8]))
            for rank, b in enumerate(ordered)]


def _span(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"


def split_problem(ranks: list[PlacedRank], tensor: int) -> str | None:
    """Why this layout splits a tensor-parallel group over nodes (node IPs, ranks per node, the groups
    split, the fix), or None when every group is on one node."""
    groups = [ranks[i:i + tensor] for i in range(0, len(ranks), tensor)]
    split = [(g, sorted({r.node_ip for r in group}, key=[r.node_ip for r in group].index))
             for g, group in enumerate(groups) if len({r.node_id for r in group}) > 1]
    if not split:
        return None
    per_node: dict[str, list[int]] = {}
    for r in ranks:
        per_node.setdefault(r.node_ip, []).append(r.rank)
    layout = ", ".join(f"{ip}: {_span(held)} ({len(held)})" for ip, held in per_node.items())
    groups_split = "; ".join(f"group {g} ({_span([r.rank for r in groups[g]])}) spans {' and '.join(ips)}"
                             for g, ips in split)
    return (f"Ray placed this replica's {len(ranks)} NPU ranks as {layout}, which splits tensor-parallel "
            f"groups of {tensor} over nodes: {groups_split}. Their all-reduce would run over the network on "
            f"every layer, so the engine is not started (Serve retries the replica). Each node must hold whole "
            f"groups of {tensor}, and Ray fills the node with the most free NPUs first: free whole nodes, or a "
            f"multiple of {tensor} NPUs on each (`raystack status` shows who holds them), or set "
            f"parallelism.tensor to a number that divides the NPUs free on each node")


def placed_ranks() -> list[PlacedRank]:
    """This replica's ranks as vLLM will number them, from where Ray put its placement group's bundles."""
    import ray

    group = ray.util.get_current_placement_group()
    table = ray.util.placement_group_table(group)
    bundle_nodes = {int(b): node for b, node in table.get("bundles_to_node_id", {}).items()}
    npu_bundles = [i for i, bundle in enumerate(group.bundle_specs) if bundle.get("NPU")]
    node_ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    return ranks_in_vllm_order(npu_bundles, bundle_nodes, node_ips, ray.get_runtime_context().get_node_id())


class SplitTensorGroup(RuntimeError):
    """Ray placed a tensor-parallel group of this replica over two nodes; the message says where and the fix."""


def require_whole_tensor_groups(tensor: int) -> None:
    """Raise SplitTensorGroup when Ray put a tensor-parallel group of this replica's ranks on two nodes."""
    problem = split_problem(placed_ranks(), tensor)
    if problem:
        raise SplitTensorGroup(problem)
