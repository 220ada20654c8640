"""Where a replica's NPUs go: Ray's strategy by parallelism, whether a cluster fits a replica (fit_problem),
and the check that no tensor-parallel group was split over nodes (rank_layout)."""

from __future__ import annotations

import pytest

from raystack.cluster.placement import NodeCapacity, backend_demand, fit_problem, ray_placement
from raystack.cluster.rank_layout import ranks_in_vllm_order, split_problem
from raystack.config import Backend, ConfigError, parse_args, BackendApp
from raystack.engines.base import node_software


def npu(tensor: int, pipeline: int = 1, engine: str = "vllm") -> Backend:
    return Backend(name=engine, engine=engine, device="npu", parallelism={"tensor": tensor, "pipeline": pipeline})


def nodes(*free: tuple[float, float]) -> list[NodeCapacity]:
    """One node per (total NPUs, free NPUs), each offering every engine (as `raystack plan --nodes` labels them)."""
    engines = {software.label: software.planned for software in node_software().values()}
    return [NodeCapacity(f"n{i}", f"10.0.0.{i + 1}", total, left, dict(engines)) for i, (total, left) in enumerate(free)]


def test_a_group_that_fits_a_node_is_strictly_packed_and_only_pipeline_spans_nodes():
    assert ray_placement(npu(2)).strategy == "STRICT_PACK"
    assert ray_placement(npu(8)).strategy == "STRICT_PACK"
    spanning = ray_placement(npu(4, 2))
    assert spanning.strategy == "PACK" and spanning.tensor_group == 4
    assert [b["NPU"] for b in spanning.bundles] == [1] * 8  # vLLM makes one worker per NPU bundle
    assert ray_placement(npu(1)).replica == {"NPU": 1} and not ray_placement(npu(1)).bundles


def test_mindie_keeps_one_bundle_per_node():
    placement = ray_placement(npu(4, 2, engine="mindie"))
    assert placement.strategy == "STRICT_SPREAD" and [b["NPU"] for b in placement.bundles] == [4, 4]
    assert placement.tensor_group == 0  # nothing to check: a node's daemon holds its NPUs whole
    demand = backend_demand(npu(4, 2, engine="mindie"))
    assert fit_problem("m", demand, nodes((8, 8)))[0].startswith("backend m needs 8 NPUs with MindIE per replica as 4 on each of 2 nodes")
    assert fit_problem("m", demand, nodes((4, 4), (4, 4))) == (None, None)


def test_the_retired_placement_field_says_what_decides_now():
    with pytest.raises(ConfigError, match=r"placement: is no longer set in the config; remove it. raystack keeps a "
                                          r"replica with pipeline 1 on one node"):
        parse_args(BackendApp, {"model": {"name": "m", "source": "/m"},
                                "backend": {"name": "v", "device": "npu", "placement": "spread"}})


def test_a_group_that_fits_a_node_needs_one_node_with_that_many_npus():
    demand = backend_demand(npu(4))
    never, _ = fit_problem("q@vllm", demand, nodes((2, 2), (2, 2), (2, 2)))
    assert never.startswith("backend q@vllm needs 4 NPUs with vLLM-Ascend per replica on one node (tensor 4 x pipeline 1), but the "
                            "cluster has 6 NPUs with vLLM-Ascend on 3 node(s) (largest node: 2)")
    _, not_now = fit_problem("q@vllm", demand, nodes((4, 3), (4, 3)))  # 6 free, but on no single node
    assert not_now.startswith("backend q@vllm needs 4 NPUs with vLLM-Ascend per replica on one node; only 0 are free that way now")
    assert fit_problem("q@vllm", demand, nodes((4, 3), (8, 4))) == (None, None)


def test_a_multi_node_group_needs_nodes_that_hold_whole_tensor_groups():
    demand = backend_demand(npu(4, 2))  # two groups of 4
    never, _ = fit_problem("q@vllm", demand, nodes((6, 6), (6, 6)))  # one group of 4 on each
    assert never is None
    never, _ = fit_problem("q@vllm", demand, nodes((6, 6), (3, 3)))  # 9 NPUs, room for one group
    assert never.startswith("backend q@vllm needs 8 NPUs with vLLM-Ascend per replica as 2 tensor-parallel groups of 4, each group "
                            "on one node (tensor 4 x pipeline 2), but the cluster has 9 NPUs with vLLM-Ascend on 2 node(s)")
    _, not_now = fit_problem("q@vllm", demand, nodes((8, 3), (8, 5)))  # 8 free, but 3 + 5: one whole group
    assert not_now.startswith("backend q@vllm needs 8 NPUs with vLLM-Ascend per replica as 2 tensor-parallel groups of 4, each "
                              "group on one node; only 4 are free that way now")
    assert fit_problem("q@vllm", demand, nodes((8, 8))) == (None, None)  # both groups on one node is fine


def test_vllm_numbers_ranks_driver_node_first_then_by_node_id():
    placed = {0: "a", 1: "c", 2: "b", 3: "c", 4: "a", 5: "b"}  # vLLM's own docstring example, driver on a
    ranks = ranks_in_vllm_order(list(range(6)), placed, {"a": "10.0.0.1", "b": "10.0.0.2", "c": "10.0.0.3"}, "a")
    assert [(r.rank, r.bundle, r.node_id) for r in ranks] == [
        (0, 0, "a"), (1, 4, "a"), (2, 2, "b"), (3, 5, "b"), (4, 1, "c"), (5, 3, "c")]
    driver_on_c = ranks_in_vllm_order(list(range(6)), placed, {}, "c")
    assert [r.bundle for r in driver_on_c] == [1, 3, 0, 4, 2, 5]


def test_whole_tensor_groups_pass_and_a_split_one_is_named_with_its_nodes_and_the_fix():
    ips = {"a": "10.0.0.1", "b": "10.0.0.2"}
    whole = ranks_in_vllm_order(list(range(8)), {i: "ab"[i % 2] for i in range(8)}, ips, "a")
    assert split_problem(whole, 4) is None  # 4 + 4, interleaved bundles: vLLM's order makes them whole
    assert split_problem(whole, 2) is None
    split = ranks_in_vllm_order(list(range(8)), {**{i: "a" for i in range(6)}, 6: "b", 7: "b"}, ips, "a")
    assert split_problem(split, 2) is None  # 6 + 2 holds whole pairs
    problem = split_problem(split, 4)
    assert problem.startswith("Ray placed this replica's 8 NPU ranks as 10.0.0.1: ranks 0-5 (6), 10.0.0.2: ranks "
                              "6-7 (2), which splits tensor-parallel groups of 4 over nodes: group 1 (ranks 4-7) "
                              "spans 10.0.0.1 and 10.0.0.2.")
    assert "free whole nodes, or a multiple of 4 NPUs on each" in problem
    odd = ranks_in_vllm_order(list(range(4)), {0: "a", 1: "a", 2: "a", 3: "b"}, ips, "b")
    assert "10.0.0.2: rank 0 (1), 10.0.0.1: ranks 1-3 (3)" in split_problem(odd, 2)
    assert "group 0 (ranks 0-1) spans 10.0.0.2 and 10.0.0.1" in split_problem(odd, 2)
