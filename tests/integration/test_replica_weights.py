"""Weights where the ranks are: a replica whose ranks span two nodes gets the checkpoint on both, at the one
path its engine is given, downloaded once per node.

The two NPU nodes are real `ray start` nodes joined to a simulated head, each in a mount namespace of its
own with a private tmpfs over the cache directory: what one node downloads the other does not see, as on
separate machines. The models come from a stand-in Hugging Face Hub (tests/hub_standin.py) that counts
what it serves. Two backends of one model run on the toy engine, which answers with the path it was
given: one replica whose ranks span both nodes (pipeline 3 on nodes of 2 NPUs), one on a single NPU beside
its ranks."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raystack.app import delete_stack, run_stack
from raystack.config import backend_app_name
from tests.hub_standin import HubStandIn
from tests.serve_cluster import serve_cluster

NODE_IPS = ["127.0.0.2", "127.0.0.3"]
REPO = "Org/Tiny"
WEIGHTS = os.urandom(64 * 1024)

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                reason="private caches per node need mount namespaces (root and unshare)")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    (repo / "config.json").write_text('{"model_type": "tiny"}')
    (repo / "model.safetensors").write_bytes(WEIGHTS)
    with HubStandIn({REPO: repo}) as running:
        yield running


@pytest.fixture(scope="module")
def cluster(hub, tmp_path_factory):
    """A head with Serve (2 CPUs, no NPU) and the two NPU nodes, each in its own mount namespace; yields
    Serve's URL and the cache path."""
    cache = tmp_path_factory.mktemp("cache")  # one path; each node mounts its own tmpfs over it
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(cache / "hf-home")}
    ray_bin = Path(sys.executable).with_name("ray")
    logs = tmp_path_factory.mktemp("node-logs")
    with serve_cluster([], head={"num_cpus": 2}) as running:
        nodes = []
        try:
            for joined, ip in enumerate(NODE_IPS, start=2):  # one at a time: two at once time out on 2 cores
                command = (f'mount -t tmpfs tmpfs "{cache}" && exec "{ray_bin}" start '
                           f'--address={running.cluster.address} --node-ip-address={ip} --num-cpus=2 '
                           f'--resources=\'{{"NPU": 2}}\' --block')
                with open(logs / f"{ip}.log", "w") as log:
                    nodes.append(subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", command],
                                                  env=env, start_new_session=True, stdout=log, stderr=log))
                deadline = time.monotonic() + 120
                while sum(n["Alive"] for n in ray.nodes()) < joined:
                    assert time.monotonic() < deadline and nodes[-1].poll() is None, (
                        f"node {ip} did not join:\n{(logs / f'{ip}.log').read_text()[-3000:]}")
                    time.sleep(1)
            os.environ["HF_ENDPOINT"] = hub.url  # build_backend reads the model's config.json from the hub too
            yield running.url, cache
        finally:
            os.environ.pop("HF_ENDPOINT", None)
            for node in nodes:
                os.killpg(node.pid, signal.SIGTERM)  # `ray start --block` stops its node's processes
            for node in nodes:
                try:
                    node.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(node.pid, signal.SIGKILL)
                    node.wait()


@ray.remote(num_cpus=0)
def cached(path: str) -> dict:
    """What this node's cache holds at `path`."""
    model = Path(path)
    return {"ip": ray.util.get_node_ip_address(), "complete": (model / ".raystack-complete").is_file(),
            "weights": (model / "model.safetensors").read_bytes() if (model / "model.safetensors").is_file() else b""}


def on_every_npu_node(path: str) -> list[dict]:
    npu_nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("NPU")]
    return ray.get([cached.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                    .remote(path) for n in npu_nodes])


def spread_backend(name: str, pipeline: int = 3) -> dict:
    """Pipeline 3 on two nodes of 2 NPUs: Ray's PACK must put its ranks on both."""
    return {"name": name, "engine": "toy", "device": "npu", "parallelism": {"tensor": 1, "pipeline": pipeline},
            "toy": {"prefix": "{model}"}, "resources": {"cpus": 0.1}}


def test_every_node_of_a_replica_gets_the_checkpoint_once_at_one_path(cluster, hub):
    url, cache = cluster
    args = {"cache_dir": str(cache), "models": [{"name": "tiny", "source": f"hf://{REPO}",
                                                 "backends": [spread_backend("a"), spread_backend("b", pipeline=1)]}]}
    run_stack(args, name="weights", route_prefix="/weights")
    try:
        expected = str(cache / "hf" / REPO)
        for backend in ("a", "b"):
            r = httpx.post(f"{url}/weights/v1/chat/completions", timeout=60,
                           json={"model": f"tiny@{backend}", "messages": [{"role": "user", "content": "where?"}]})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"].split()[0] == expected
        seen = on_every_npu_node(expected)
        assert sorted(s["ip"] for s in seen) == NODE_IPS
        assert all(s["complete"] and s["weights"] == WEIGHTS for s in seen), "a node lacks the checkpoint"
        # Two replicas on one node (a's ranks and b's), yet each node downloaded the weights once.
        assert hub.downloads(REPO, "model.safetensors") == len(NODE_IPS)
    finally:
        delete_stack("weights")


def test_a_cache_declared_shared_that_a_node_does_not_see_fails_the_replica_plainly(cluster, hub):
    url, cache = cluster
    args = {"cache_dir": str(cache / "shared"), "cache_shared": True,
            "models": [{"name": "tiny", "source": f"hf://{REPO}", "backends": [spread_backend("a")]}]}
    run_stack(args, name="shared", route_prefix="/shared", wait=False)
    try:
        deadline = time.monotonic() + 180
        while True:
            status = serve.status().applications.get(backend_app_name("shared", "tiny", "a"))
            message = status.deployments["LLMServer-tiny-a"].message if status and status.deployments else ""
            if "does not see" in message or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert "does not see hf://Org/Tiny complete in the shared cache" in message, message
        assert "Mount the shared storage there" in message
    finally:
        delete_stack("shared")
