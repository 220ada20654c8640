"""NPU placement on a real multi-node Ray cluster, simulated on one machine with ray.cluster_utils.

Two nodes declare 4 NPUs each (Ascend910B3, registered the way `raystack start` registers them) and a
third is CPU-only. Backends are deployed with Ray Serve using exactly the options build_app gives them.
The replica stands in for vLLM's Ray executor (which the CPU platform refuses to run): it starts one
worker per NPU bundle of its placement group and reports where each landed and what NPUs it sees.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raystack.app import build_app, deployment_options
from raystack.cluster.node import plan_start
from raystack.cluster.npu import NodeNPUs, NPUChip
from raystack.cluster.placement import backend_demand, cluster_capacity, fit_problem
from raystack.config import Backend, ConfigError
from tests.e2e.conftest import free_port


def npu_node_args(count: int) -> dict:
    """The resources and labels `raystack start` registers for a node of `count` Ascend910B3 chips."""
    chips = [NPUChip(i, 0, i, "910B3", "OK", 65536) for i in range(count)]
    plan = plan_start(NodeNPUs(chips, [], "Ascend910B3", 64.0, "test", []), head=True, ifname="lo")
    import json

    [resources] = [a for a in plan.command if a.startswith("--resources=")]
    [labels] = [a for a in plan.command if a.startswith("--labels=")]
    return {
        "resources": json.loads(resources.split("=", 1)[1]),
        "labels": dict(kv.split("=", 1) for kv in labels.split("=", 1)[1].split(",")),
    }


@pytest.fixture(scope="module")
def cluster():
    # CPU-only head, with a dashboard of its own (8265 may belong to another Ray instance on this machine)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": True,
                                                      "dashboard_port": free_port()})
    for _ in range(2):
        c.add_node(num_cpus=2, **npu_node_args(4))
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield c
    serve.shutdown()
    ray.shutdown()
    c.shutdown()


@ray.remote(num_cpus=0)
class EngineWorker:
    def where(self):
        ctx = ray.get_runtime_context()
        return {
            "node": ctx.get_node_id(),
            "granted": ctx.get_accelerator_ids().get("NPU", []),
            "visible": os.environ.get("ASCEND_RT_VISIBLE_DEVICES"),
        }


@serve.deployment
class ExecutorStandIn:
    """What vLLM's Ray executor does with the replica's placement group: one worker per NPU bundle."""

    def __init__(self):
        pg = ray.util.get_current_placement_group()
        npu_bundles = [i for i, b in enumerate(pg.bundle_specs) if b.get("NPU")]
        self.workers = [
            EngineWorker.options(
                resources={"NPU": 1},
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
            ).remote()
            for i in npu_bundles
        ]

    async def __call__(self):
        return [await w.where.remote() for w in self.workers]


def deploy(backend: Backend, name: str):
    app = ExecutorStandIn.options(name=name, **deployment_options(backend)).bind()
    handle = serve.run(app, name=name, route_prefix=None)
    return handle.remote().result(timeout_s=120)


def npu_backend(tensor: int, pipeline: int = 1, placement: str = "pack") -> Backend:
    return Backend(name="vllm", device="npu", accelerator={"type": "Ascend910B"}, resources={"cpus": 0.5},
                   parallelism={"tensor": tensor, "pipeline": pipeline}, placement=placement)


def test_tp4_packs_on_one_node_and_each_worker_sees_its_granted_npu(cluster):
    workers = deploy(npu_backend(4), "tp4")
    assert len(workers) == 4
    assert len({w["node"] for w in workers}) == 1
    for w in workers:
        assert len(w["granted"]) == 1
        assert w["visible"] == w["granted"][0]  # what the engine worker sees is what Ray granted
    assert len({w["granted"][0] for w in workers}) == 4
    serve.delete("tp4")


def test_tp4_pp2_spans_both_npu_nodes(cluster):
    workers = deploy(npu_backend(4, 2), "tp4pp2")
    per_node = Counter(w["node"] for w in workers)
    assert sorted(per_node.values()) == [4, 4]
    for node in per_node:
        ids = sorted(w["granted"][0] for w in workers if w["node"] == node)
        assert ids == ["0", "1", "2", "3"]
    serve.delete("tp4pp2")


def test_capacity_messages_are_plain(cluster):
    nodes = cluster_capacity()
    never, _ = fit_problem("qwen3@vllm", backend_demand(npu_backend(16)), nodes)
    assert never.startswith("backend qwen3@vllm needs 16 Ascend910B NPUs per replica in the cluster")
    assert "the cluster has 8 Ascend910B NPUs on 2 node(s)" in never
    never, _ = fit_problem("qwen3@vllm", backend_demand(npu_backend(8, placement="strict_pack")), nodes)
    assert "on one node (strict_pack)" in never and "largest node: 4" in never
    never, _ = fit_problem("x@vllm", backend_demand(Backend(name="vllm", device="npu", accelerator={"type": "Ascend310P"})), nodes)
    assert "the cluster has 0 Ascend310P NPUs on 0 node(s)" in never
    assert fit_problem("qwen3@vllm", backend_demand(npu_backend(8)), nodes) == (None, None)


def test_serve_run_refuses_a_backend_the_cluster_can_never_host(cluster, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    args = {"models": [{"name": "qwen3", "source": str(tmp_path), "backends": [
        {"name": "vllm", "device": "npu", "accelerator": {"type": "Ascend910B"},
         "parallelism": {"tensor": 16}}]}]}
    with pytest.raises(ConfigError, match=r"models\[0\]\.backends\[0\]: backend qwen3@vllm needs 16 Ascend910B NPUs"):
        build_app(args)


def test_status_shows_who_holds_the_npus_and_why_a_replica_waits(cluster):
    import time

    from raystack.cluster import status

    deploy(npu_backend(4, 2), "big")  # all 8 NPUs
    # A second backend of 4 NPUs can never start while "big" holds them: Ray would just keep it STARTING.
    serve._run(ExecutorStandIn.options(name="waiting", **deployment_options(npu_backend(4))).bind(),
               name="waiting", route_prefix=None, _blocking=False)
    deadline = time.monotonic() + 60
    while True:
        result = status.gather()
        if result["problems"] or time.monotonic() > deadline:
            break
        time.sleep(2)
    npu_nodes = [n for n in result["nodes"] if n["npus"]]
    assert len(npu_nodes) == 2
    assert all((n["npu_type"], n["hbm_gib"], n["npus_free"]) == ("Ascend910B3", "64", 0) for n in npu_nodes)
    assert all(sum(h["npus"] for h in n["held_by"]) == 4 for n in npu_nodes)
    assert [n for n in result["nodes"] if not n["npus"]]  # the CPU-only node is listed too
    [problem] = result["problems"]
    assert problem.startswith("backend waiting/waiting/")  # app/deployment/replica
    assert problem.endswith("needs 4 Ascend910B NPUs per replica in the cluster; only 0 are free now, "
                            "so a new replica waits until other replicas release theirs")
    text = status.render(result)
    assert "CANNOT PLACE" in text and "Ascend910B3" in text
    assert {a["name"] for a in result["applications"]} >= {"big", "waiting"}
    serve.delete("waiting")
    serve.delete("big")
