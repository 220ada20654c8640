"""Each engine's replicas on its own nodes, on a real multi-node Ray cluster simulated on one machine: one
node runs vLLM on NPUs (raystack start found vllm-ascend in its Python), the other MindIE (found under its
Ascend home: the stand-in MindIE 2.1), 4 Ascend910B3 NPUs each, started with exactly what `raystack start`
gives them. Family, HBM and free NPUs would let either backend land on either node; only the engine label
keeps them apart. The MindIE replicas are real (the stand-in daemon answers through the router); the vLLM
replicas are LLMServer-less stand-ins with the deployment options build_backend gives a vLLM backend (vLLM's
NPU platform cannot run here)."""

from __future__ import annotations

import time

import openai
import pytest
from ray import serve

from raystack.app import delete_stack, deployment_options, run_stack
from raystack.cluster import status
from raystack.config import Backend
from tests.mindie_standin import install_mindie, model_weights
from tests.npu_nodes import engines_at, npu_node_args, vllm_ascend_site
from tests.serve_cluster import free_port, serve_cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("nodes")
    home = install_mindie(root / "mindie-image")
    vllm_node = npu_node_args("910B3", 4, 65536, engines=engines_at(vllm_ascend_site(root / "vllm-image")))
    mindie_node = npu_node_args("910B3", 4, 65536, engines=engines_at(ascend_home=home))
    assert set(vllm_node["labels"]) - set(mindie_node["labels"]) == {"raystack.io/engine-vllm"}
    assert mindie_node["labels"]["raystack.io/engine-mindie"] == "2.1"
    head = {"num_cpus": 2, "include_dashboard": True, "dashboard_port": free_port()}
    with serve_cluster([vllm_node, mindie_node], head=head) as running:
        yield running.url, home, root


@serve.deployment
class VLLMStandIn:
    async def __call__(self):
        return "ok"


def holders_by_engine() -> dict[str, list[str]]:
    """What `raystack status` shows: the engine of each NPU node -> the replicas holding its NPUs."""
    nodes = status.gather()["nodes"]
    return {", ".join(n["engines"]): [h["holder"] for h in n["held_by"]] for n in nodes if n["npus"]}


def test_mindie_replicas_go_only_to_the_mindie_node_and_vllm_replicas_only_to_the_vllm_node(cluster):
    url, home, root = cluster
    control = root / "control"
    control.mkdir()
    mindie = {"name": "mindie", "engine": "mindie", "accelerator": {"type": "Ascend910B"},
              "parallelism": {"tensor": 2, "pipeline": 1}, "max_model_len": 1024, "resources": {"cpus": 0.1},
              "mindie": {"ascend_home": str(home), "startup_timeout_s": 60},
              "env": {"STANDIN_CONTROL": str(control), "STANDIN_LOAD_S": "0"},
              "autoscaling": {"min_replicas": 2, "max_replicas": 2}, "graceful_shutdown_timeout_s": 10}
    vllm = Backend(name="vllm", device="npu", accelerator={"type": "Ascend910B"}, resources={"cpus": 0.1},
                   autoscaling={"min_replicas": 4, "max_replicas": 4})
    # vLLM first: with no engine label to stop them, its 4 replicas could take NPUs of either node
    serve.run(VLLMStandIn.options(name="vllm", **deployment_options(vllm)).bind(), name="vllm", route_prefix=None)
    try:
        # Not waited on without bound: were vLLM replicas on the MindIE node, MindIE's would never be placed.
        run_stack({"models": [{"name": "qwen3", "source": str(model_weights(root)), "backends": [mindie]}],
                   "router": {"request_timeout_s": 10}},  # no longer than the backend's drain bound
                  name="mixed", route_prefix="/mixed", wait=False)
        deadline = time.monotonic() + 180
        while not running("mixed") and time.monotonic() < deadline:
            time.sleep(1)
        assert running("mixed"), f"MindIE's replicas were not placed; NPUs held by engine: {holders_by_engine()}"
        answer = openai.OpenAI(base_url=f"{url}/mixed/v1", api_key="unused", max_retries=0, timeout=30
                               ).chat.completions.create(model="qwen3", messages=[{"role": "user", "content": "where?"}],
                                                         max_tokens=3)
        assert len(answer.choices[0].message.content.split()) == 3
        held = holders_by_engine()
        assert set(held) == {"vLLM-Ascend 0.23", "MindIE 2.1"}
        assert len(held["vLLM-Ascend 0.23"]) == 4 and all("#vllm#" in h for h in held["vLLM-Ascend 0.23"])
        assert len(held["MindIE 2.1"]) == 2 and all("LLMServer-qwen3-mindie" in h for h in held["MindIE 2.1"])
    finally:
        delete_stack("mixed")
        serve.delete("vllm")


def running(router: str) -> bool:
    """Whether the router application `router` and every backend application naming it run."""
    apps = {name: app for name, app in serve.status().applications.items() if name.split(".")[0] == router}
    return len(apps) > 1 and all(app.status == "RUNNING" for app in apps.values())
