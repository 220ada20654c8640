"""NPU placement on a real multi-node Ray cluster, simulated on one machine with ray.cluster_utils, under
what `raystack start` gives a real node: its resources, its labels and its environment (notably
RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES=1, so Ray leaves ASCEND_RT_VISIBLE_DEVICES at the node's
whole list in every worker).

Node A has 5 Ascend910B3 chips (64 GB) of which chip 2 reports Critical, so it registers 4 NPUs with
device ids 0,1,3,4; node B has 4 Ascend910B4 chips (32 GB); both run vLLM-Ascend (no MindIE); the head is
CPU-only. Backends are deployed
with Ray Serve using exactly the options build_backend gives them. One-NPU replicas are real LLMServers (the
toy engine reports what its process sees); a multi-NPU replica stands in for vLLM's Ray executor (which
the CPU platform refuses to run), doing with its placement group what vLLM 0.23's RayExecutorV2 does.
"""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raystack.app import delete_stack, deployment_options, run_stack
from raystack.cluster.chips import ACCELERATOR_LABEL
from raystack.cluster.placement import backend_demand, cluster_capacity, fit_problem
from raystack.config import Backend, ConfigError, backend_app_name
from tests import FIXTURES
from tests.npu_nodes import engines_at, npu_node_args, vllm_ascend_site
from tests.serve_cluster import free_port, serve_cluster


NODE_A_DEVICES = ["0", "1", "3", "4"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # CPU-only head, with a dashboard of its own (8265 may belong to another Ray instance on this machine)
    head = {"num_cpus": 2, "include_dashboard": True, "dashboard_port": free_port()}
    # Both NPU nodes run vLLM on NPUs: raystack start found vllm-ascend in their Python (its metadata).
    vllm = engines_at(vllm_ascend_site(tmp_path_factory.mktemp("vllm-ascend-image")))
    nodes = [npu_node_args("910B3", 5, 65536, critical=(2,), engines=vllm), npu_node_args("910B4", 4, 32768, engines=vllm)]
    assert nodes[0]["labels"]["raystack.io/engine-vllm"] == "0.23"
    assert nodes[0]["env_vars"]["RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES"] == "1"
    assert nodes[0]["env_vars"]["ASCEND_RT_VISIBLE_DEVICES"] == ",".join(NODE_A_DEVICES)
    with serve_cluster(nodes, head=head) as running:
        yield running


@pytest.fixture(autouse=True)
def every_npu_free(cluster):
    """Each test starts on a cluster whose NPUs are all free. Ray returns a deleted replica's NPUs a moment
    after serve.delete returns; with Serve's controller passing every 0.5 s (raystack/process.py), the next
    test could start before (seen in CI)."""
    deadline = time.monotonic() + 30
    while any(n.npu_free != n.npu_total for n in cluster_capacity()):
        assert time.monotonic() < deadline, f"NPUs still held 30 s after the last test: {cluster_capacity()}"
        time.sleep(0.2)


@ray.remote(num_cpus=0)
class EngineWorker:
    def where(self):
        ctx = ray.get_runtime_context()
        return {
            "node": ctx.get_node_id(),
            "granted": ctx.get_accelerator_ids().get("NPU", []),
            "inherited": os.environ.get("ASCEND_RT_VISIBLE_DEVICES"),  # from the node, before vLLM sets it
            "labels": ctx.get_node_labels(),
        }


@serve.deployment
class ExecutorStandIn:
    """What vLLM 0.23's Ray executor (RayExecutorV2, vllm/v1/executor/ray_executor_v2.py, steps 5-7) does
    with the replica's placement group: one worker per NPU bundle; then each worker gets
    ASCEND_RT_VISIBLE_DEVICES = the sorted ids Ray granted the executor's workers on its node, and its
    local rank (its place among those workers) picks the one it opens."""

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
        found = [await w.where.remote() for w in self.workers]
        node_workers, node_devices = defaultdict(list), defaultdict(list)
        for i, worker in enumerate(found):
            node_workers[worker["node"]].append(i)
            node_devices[worker["node"]] += [int(g) for g in worker["granted"]]
        for i, worker in enumerate(found):
            visible = sorted(node_devices[worker["node"]])
            worker["visible"] = ",".join(map(str, visible))
            worker["opens"] = str(visible[node_workers[worker["node"]].index(i)])
        return found


def tiny_checkpoint(path: Path) -> None:
    """A model directory raystack can size (SmolLM2-135M's config.json: a few GiB per NPU, which every NPU
    has, so no HBM condition): the toy engine reads nothing else."""
    (path / "config.json").write_text((FIXTURES / "model_configs" / "smollm2-135m-instruct.json").read_text())


def deploy(backend: Backend, name: str, min_hbm_gib: float | None = None):
    app = ExecutorStandIn.options(name=name, **deployment_options(backend, min_hbm_gib=min_hbm_gib)).bind()
    handle = serve.run(app, name=name, route_prefix=None)
    return handle.remote().result(timeout_s=120)


def npu_backend(tensor: int, pipeline: int = 1, chip: str = "Ascend910B") -> Backend:
    return Backend(name="vllm", device="npu", accelerator={"type": chip}, resources={"cpus": 0.5},
                   parallelism={"tensor": tensor, "pipeline": pipeline})


def test_tp4_packs_on_one_node_and_each_worker_opens_its_granted_npu(cluster):
    workers = deploy(npu_backend(4), "tp4")
    assert len(workers) == 4 and len({w["node"] for w in workers}) == 1
    for w in workers:
        assert len(w["granted"]) == 1 and w["opens"] == w["granted"][0]
    assert len({w["opens"] for w in workers}) == 4
    serve.delete("tp4")


def test_tp4_pp2_spans_both_npu_nodes(cluster):
    workers = deploy(npu_backend(4, 2), "tp4pp2")
    per_node = Counter(w["node"] for w in workers)
    assert sorted(per_node.values()) == [4, 4]
    for node in per_node:
        on_node = [w for w in workers if w["node"] == node]
        # Every NPU of the node, each opened once: the node's own device ids (A's skip the Critical chip 2).
        assert sorted(w["opens"] for w in on_node) == sorted(on_node[0]["inherited"].split(","))
    assert {w["inherited"] for w in workers} == {"0,1,3,4", "0,1,2,3"}
    serve.delete("tp4pp2")


def ask_every_replica(base: str, model: str, replicas: int) -> dict[str, str]:
    """replica -> its answer, asking until `replicas` distinct replicas have answered."""
    answers: dict[str, str] = {}
    for _ in range(60):
        r = httpx.post(f"{base}/v1/chat/completions", timeout=30,
                       json={"model": model, "messages": [{"role": "user", "content": "where?"}]})
        assert r.status_code == 200, r.text
        answers[r.headers["x-raystack-replica"]] = r.json()["choices"][0]["message"]["content"]
        if len(answers) == replicas:
            return answers
    raise AssertionError(f"only {len(answers)} of {replicas} replicas answered: {answers}")


def test_every_replica_opens_exactly_the_npus_ray_granted_it(cluster, tmp_path):
    """Under raystack start's environment every worker inherits node A's whole list; still, two one-NPU
    replicas (real LLMServers, whose engine would open device 0 of what it sees) and a TP=2 replica see
    disjoint sets, each equal to its grant."""
    tiny_checkpoint(tmp_path)  # the toy engine's "checkpoint"
    args = {"models": [{"name": "where", "source": str(tmp_path), "backends": [
        {"name": "one", "engine": "toy", "device": "npu", "accelerator": {"type": "Ascend910B3"},
         "toy": {"prefix": "visible={visible} granted={granted}"},
         "autoscaling": {"min_replicas": 2, "max_replicas": 2}}]}]}
    run_stack(args, name="where", route_prefix="/where")
    tp2 = deploy(npu_backend(2, chip="Ascend910B3"), "tp2")
    try:
        seen = []
        for answer in ask_every_replica(f"{cluster.url}/where", "where", 2).values():
            visible, granted = (part.split("=")[1] for part in answer.split()[:2])
            assert visible == granted and len(granted.split(",")) == 1, answer
            seen.append(visible)
        assert {w["inherited"] for w in tp2} == {",".join(NODE_A_DEVICES)}  # raystack start's env is in force
        assert len({w["node"] for w in tp2}) == 1
        assert sorted(w["opens"] for w in tp2) == sorted(g for w in tp2 for g in w["granted"])
        seen += [w["opens"] for w in tp2]
        assert len(seen) == len(set(seen)) == 4 and set(seen) == set(NODE_A_DEVICES)
    finally:
        serve.delete("tp2")
        delete_stack("where")


def test_replicas_land_only_where_the_chip_and_its_hbm_qualify(cluster):
    # Family Ascend910B covers node A (910B3, 64 GB) and node B (910B4, 32 GB); a replica needing 44 GiB
    # of HBM per NPU fits only A, one naming the model Ascend910B4 only B.
    big = deploy(npu_backend(2), "big", min_hbm_gib=44.5)
    assert {w["labels"]["raystack.io/npu-hbm-gib"] for w in big} == {"64"}
    b4 = deploy(npu_backend(2, chip="Ascend910B4"), "b4")
    assert {w["labels"]["ray.io/accelerator-type"] for w in b4} == {"Ascend910B4"}
    serve.delete("big")
    serve.delete("b4")


def test_capacity_messages_are_plain(cluster):
    nodes = cluster_capacity()
    never, _ = fit_problem("qwen3@vllm", backend_demand(npu_backend(4, 4)), nodes)
    assert never.startswith("backend qwen3@vllm needs 16 Ascend910B NPUs with vLLM-Ascend per replica as 4 "
                            "tensor-parallel groups of 4, each group on one node (tensor 4 x pipeline 4)")
    assert "the cluster has 8 Ascend910B NPUs with vLLM-Ascend on 2 node(s)" in never
    never, _ = fit_problem("qwen3@vllm", backend_demand(npu_backend(8)), nodes)
    assert "on one node (tensor 8 x pipeline 1)" in never and "largest node: 4" in never
    never, _ = fit_problem("x@vllm", backend_demand(Backend(name="vllm", device="npu", accelerator={"type": "Ascend310P"})), nodes)
    assert "the cluster has 0 Ascend310P NPUs with vLLM-Ascend on 0 node(s)" in never
    never, _ = fit_problem("q@vllm", backend_demand(npu_backend(1, chip="Ascend910B4"), min_hbm_gib=44.5), nodes)
    assert never.startswith("backend q@vllm needs 1 Ascend910B4 NPUs with vLLM-Ascend and at least 48 GiB HBM each "
                            "per replica")
    assert fit_problem("qwen3@vllm", backend_demand(npu_backend(4, 2)), nodes) == (None, None)


def placement_group_of(app: str) -> dict:
    """Ray's record of the placement group Serve made for `app`'s replica (named SERVE_REPLICA::app#...)."""
    groups = [pg for pg in ray.util.placement_group_table().values()
              if (pg.get("name") or "").startswith(f"SERVE_REPLICA::{app}#") and pg.get("state") != "REMOVED"]
    assert len(groups) == 1, groups
    return groups[0]


def hold_npus(count: int, chip: str):
    """A placement group holding `count` NPUs of the node whose chip is `chip`, once Ray placed it."""
    from ray.util.placement_group import placement_group

    group = placement_group([{"NPU": count}], strategy="STRICT_PACK", bundle_label_selector=[{ACCELERATOR_LABEL: chip}])
    ray.get(group.ready(), timeout=60)
    return group


def test_a_tp2_group_is_never_split_over_nodes(cluster):
    """With one NPU free on each node, a TP=2 replica waits (Ray's PACK would split it 1 + 1); once a node
    has two free, the whole group lands there."""
    from ray.util.placement_group import remove_placement_group

    holders = [hold_npus(3, "Ascend910B3"), hold_npus(3, "Ascend910B4")]
    try:
        assert sorted(n.npu_free for n in cluster_capacity() if n.npu_total) == [1, 1]
        app = ExecutorStandIn.options(name="tp2", **deployment_options(npu_backend(2))).bind()
        handle = serve._run(app, name="tp2", route_prefix=None, _blocking=False)  # serve.run waits for it
        deadline = time.monotonic() + 30
        while "SERVE_REPLICA::tp2#" not in str(ray.util.placement_group_table()) and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(5)  # Ray had time to place it, were it allowed to split
        waiting = placement_group_of("tp2")
        assert waiting["state"] == "PENDING" and not any(waiting["bundles_to_node_id"].values()), waiting
        freed = set(ray.util.placement_group_table(holders[1])["bundles_to_node_id"].values())
        remove_placement_group(holders[1])
        workers = handle.remote().result(timeout_s=120)
        assert len(workers) == 2 and {w["node"] for w in workers} == freed
        assert sorted(w["opens"] for w in workers) == sorted(g for w in workers for g in w["granted"])
    finally:
        serve.delete("tp2")
        for h in holders:
            remove_placement_group(h)


def test_a_replica_over_nodes_refuses_a_layout_that_splits_a_tensor_group(cluster, tmp_path):
    """TP=2 x PP=2 with three NPUs free on each node: Ray's PACK puts three ranks on one node and one on the
    other, splitting a pair; the replica stops before its engine starts, naming the split and the fix."""
    from ray.util.placement_group import remove_placement_group

    holders = [hold_npus(1, "Ascend910B3"), hold_npus(1, "Ascend910B4")]
    tiny_checkpoint(tmp_path)
    args = {"models": [{"name": "split", "source": str(tmp_path), "backends": [
        {"name": "toy", "engine": "toy", "device": "npu", "accelerator": {"type": "Ascend910B"},
         "parallelism": {"tensor": 2, "pipeline": 2}, "graceful_shutdown_timeout_s": 5}]}],
            "router": {"request_timeout_s": 5}}  # a drain bound covers the longest answer the router allows
    try:
        run_stack(args, name="split", route_prefix="/split", wait=False)
        deadline = time.monotonic() + 120
        message = ""
        while "splits tensor-parallel groups" not in message and time.monotonic() < deadline:
            time.sleep(2)
            status = serve.status().applications.get(backend_app_name("split", "split", "toy"))
            message = status.deployments["LLMServer-split-toy"].message if status and status.deployments else ""
        assert "Ray placed this replica's 4 NPU ranks as " in message, message
        assert "which splits tensor-parallel groups of 2 over nodes: group 1 (ranks 2-3) spans " in message
        assert "free whole nodes, or a multiple of 2 NPUs on each" in message
    finally:
        delete_stack("split")
        for h in holders:
            remove_placement_group(h)


def test_serve_run_refuses_a_model_no_nodes_npus_can_hold(cluster, tmp_path):
    # Qwen3-14B in bf16 at TP 1 with a 32k context needs ~44 GiB per NPU: more than a 910B4's 32 GB.
    (tmp_path / "config.json").write_text((FIXTURES / "model_configs" / "qwen3-14b.json").read_text())
    args = {"models": [{"name": "qwen3-14b", "source": str(tmp_path), "backends": [
        {"name": "vllm", "device": "npu", "accelerator": {"type": "Ascend910B4"}, "max_model_len": 32768}]}]}
    with pytest.raises(ConfigError, match=r"needs 1 Ascend910B4 NPUs with vLLM-Ascend and at least 48 GiB HBM each "
                                          r"per replica .*but the cluster has 0 Ascend910B4 NPUs with vLLM-Ascend and "
                                          r"at least 48 GiB"):
        run_stack(args, name="never")


def test_serve_run_refuses_a_backend_the_cluster_can_never_host(cluster, tmp_path):
    tiny_checkpoint(tmp_path)
    args = {"models": [{"name": "qwen3", "source": str(tmp_path), "backends": [
        {"name": "vllm", "device": "npu", "accelerator": {"type": "Ascend910B"},
         "parallelism": {"tensor": 16}}]}]}
    with pytest.raises(ConfigError, match=r"cannot deploy this config:\n  backend qwen3@vllm needs 16 Ascend910B NPUs"):
        run_stack(args, name="never")


def test_serve_run_refuses_an_engine_no_node_offers_and_names_each_nodes_engines(cluster, tmp_path):
    tiny_checkpoint(tmp_path)
    args = {"models": [{"name": "qwen3", "source": str(tmp_path), "backends": [
        {"name": "mindie", "engine": "mindie", "accelerator": {"type": "Ascend910B"}}]}]}
    with pytest.raises(ConfigError) as refused:
        run_stack(args, name="never")
    message = str(refused.value)
    assert message.startswith("raystack cannot deploy this config:\n  backend qwen3@mindie needs a MindIE node: "
                              "raystack.io/engine-mindie in 2.0,2.1,2.2,2.3,3.0, but no node offers it (nodes seen, "
                              "with the engines they offer: ")
    seen = message.split("they offer: ", 1)[1].split(")", 1)[0].split("; ")
    assert sorted(node.split(": ", 1)[1] for node in seen) == ["none", "vLLM-Ascend 0.23", "vLLM-Ascend 0.23"]
    assert "To fix: start a node with `raystack start` in MindIE's image" in message


def test_status_shows_who_holds_the_npus_and_why_a_replica_waits(cluster, tmp_path):
    from raystack.cluster import status

    deploy(npu_backend(4, 2), "big")  # all 8 NPUs
    # A raystack backend of 4 NPUs can never start while "big" holds them: Ray would just keep it STARTING.
    tiny_checkpoint(tmp_path)
    waiting = {"models": [{"name": "waiting", "source": str(tmp_path), "backends": [
        {"name": "toy", "engine": "toy", "device": "npu", "accelerator": {"type": "Ascend910B"},
         "parallelism": {"tensor": 4},
         # Serve stops a replica that was never placed only after its drain bound (its graceful-shutdown
         # call waits for an actor that never starts): short here, so the app deletes in seconds.
         "graceful_shutdown_timeout_s": 5}]}],
        "router": {"request_timeout_s": 5}}  # a drain bound covers the longest answer the router allows
    run_stack(waiting, name="waiting", route_prefix="/waiting", wait=False)
    deadline = time.monotonic() + 60
    while True:
        result = status.gather()
        if result["problems"] or time.monotonic() > deadline:
            break
        time.sleep(2)
    npu_nodes = [n for n in result["nodes"] if n["npus"]]
    assert sorted((n["npu_type"], n["hbm_gib"], n["npus_free"], n["engines"]) for n in npu_nodes) == [
        ("Ascend910B3", "64", 0, ["vLLM-Ascend 0.23"]), ("Ascend910B4", "32", 0, ["vLLM-Ascend 0.23"])]
    assert all(sum(h["npus"] for h in n["held_by"]) == 4 for n in npu_nodes)
    assert [n for n in result["nodes"] if not n["npus"]]  # the CPU-only node is listed too
    [problem] = result["problems"]
    assert problem.startswith("backend waiting.waiting.toy/LLMServer-waiting-toy/")  # app/deployment/replica
    assert problem.endswith("needs 4 Ascend910B NPUs per replica on one node; only 0 are free that way now, "
                            "so a new replica waits until other replicas release theirs")
    text = status.render(result)
    assert "CANNOT PLACE" in text and "Ascend910B3" in text and "vLLM-Ascend 0.23" in text
    assert {a["name"] for a in result["applications"]} >= {"big", "waiting"}
    delete_stack("waiting")
    serve.delete("big")
