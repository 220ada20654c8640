"""`raystack plan`: what each backend's replicas will run on an NPU cluster, read without NPUs, as an
operator reviews it before `serve run` (the real CLI, in a subprocess)."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests import FIXTURES, prime_model_configs

ROOT = Path(__file__).resolve().parents[2]


def plan(config: Path, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "raystack.cli", "plan", str(config), "--json", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["raystack"]


def config_file(tmp_path: Path, backends: list[dict], source: Path) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"applications": [
        {"name": "raystack", "import_path": "raystack.app:build_router", "args": {}},
        *({"name": f"raystack.qwen3-14b.{b['name']}", "route_prefix": None, "import_path": "raystack.app:build_backend",
           "args": {"model": {"name": "qwen3-14b", "source": str(source)}, "backend": b}} for b in backends),
    ]}))
    return path


def test_the_shipped_qwen3_config_as_a_910b_cluster_would_run_it(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSTACK_CACHE_DIR", str(prime_model_configs(tmp_path)))  # Qwen3-32B's config.json
    planned = plan(ROOT / "deploy_configs/qwen3.yaml")  # default: a vLLM-Ascend node and a MindIE node
    assert [n.get("raystack.io/engine-vllm") for n in planned["nodes"].values()] == ["0.23", None]
    assert [n.get("raystack.io/engine-mindie") for n in planned["nodes"].values()] == [None, "2.3"]
    backends = planned["backends"]
    vllm, mindie = backends["qwen3-32b@vllm"], backends["qwen3-32b@mindie"]
    assert vllm["engine_args"]["tensor_parallel_size"] == 2 and vllm["engine_args"]["distributed_executor_backend"] == "ray"
    assert [b["NPU"] for b in vllm["placement"]["bundles"]] == [1, 1] and vllm["placement"]["strategy"] == "STRICT_PACK"
    # Qwen3-32B at TP 2 with a 32k context needs more than a 910B4's 32 GB per NPU: 64 GB parts only.
    assert vllm["placement"]["label_selector"] == {"raystack.io/npu-family": "Ascend910B",
                                                   "raystack.io/npu-hbm-gib": "in(48,64,96,128,144,192,256)",
                                                   "raystack.io/engine-vllm": "in(0.23,0.32)"}
    assert vllm["placement"]["hbm_need_from"] == "config.json in the cache"
    assert vllm["placement"]["fits"] == mindie["placement"]["fits"] == "yes"
    assert vllm["needs"] == "a vLLM-Ascend node: raystack.io/engine-vllm in 0.23,0.32"
    # kv_aware: the vLLM backend's replicas publish their KV cache events; MindIE's are chosen by load
    assert vllm["routing"] == mindie["routing"] == "kv_aware"
    assert vllm["kv_events"].startswith("published") and mindie["kv_events"].startswith("none")
    assert mindie["needs"] == "a MindIE node: raystack.io/engine-mindie in 2.0,2.1,2.2,2.3,3.0"
    config = mindie["config.json"]
    assert config["BackendConfig"]["ScheduleConfig"]["maxIterTimes"] == config["BackendConfig"]["ModelDeployConfig"]["maxSeqLen"] == 32768
    # MindIE's timeouts follow the router's request_timeout_s (3600), not the shipped 600 s
    assert (config["ServerConfig"]["tokenTimeout"], config["ServerConfig"]["e2eTimeout"]) == (3600, 3600)
    assert mindie["set_env_scripts"][0].endswith("ascend-toolkit/set_env.sh") and mindie["env"]["MINDIE_LLM_FRAMEWORK_BACKEND"] == "ATB"


def test_a_mindie_replica_over_two_nodes_shows_its_rank_table_and_multi_node_env(tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "config.json").write_text((FIXTURES / "model_configs/qwen3-14b.json").read_text())
    config = config_file(tmp_path, [{"name": "mindie", "engine": "mindie", "accelerator": {"type": "Ascend910B"},
                                     "parallelism": {"tensor": 8, "pipeline": 2}, "max_model_len": 8192}], weights)
    mindie = plan(config, "--nodes", "2x8:Ascend910B3+mindie")["backends"]["qwen3-14b@mindie"]
    table = mindie["rank_table"]
    assert [s["container_ip"] for s in table["server_list"]] == ["10.0.0.1", "10.0.0.2"]
    assert [d["rank_id"] for s in table["server_list"] for d in s["device"]] == [str(r) for r in range(16)]
    env = mindie["env"]
    assert (env["MASTER_IP"], env["WORLD_SIZE"], env["HCCL_CONNECT_TIMEOUT"]) == ("10.0.0.1", "16", "7200")
    assert mindie["config.json"]["BackendConfig"]["multiNodesInferEnabled"] is True
    assert mindie["placement"]["strategy"] == "STRICT_SPREAD" and mindie["placement"]["fits"] == "yes"


def test_a_replica_whose_model_needs_more_hbm_than_the_nodes_have_is_flagged(tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "config.json").write_text((FIXTURES / "model_configs/qwen3-14b.json").read_text())
    config = config_file(tmp_path, [{"name": "vllm", "accelerator": {"type": "Ascend910B"}, "max_model_len": 32768}],
                         weights)
    on_b4 = plan(config, "--nodes", "2x8:Ascend910B4+vllm")["backends"]["qwen3-14b@vllm"]["placement"]
    assert on_b4["hbm_per_npu_gib"] > 40 and on_b4["label_selector"]["raystack.io/npu-hbm-gib"].startswith("in(48,")
    assert "needs 1 Ascend910B NPUs with vLLM-Ascend and at least 48 GiB HBM each per replica" in on_b4["fits"]
    assert plan(config, "--nodes", "1x8:Ascend910B4-1+vllm")["backends"]["qwen3-14b@vllm"]["placement"]["fits"] == "yes"


def test_a_backend_fits_only_where_a_node_runs_its_engine(tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "config.json").write_text((FIXTURES / "model_configs/qwen3-14b.json").read_text())
    config = config_file(tmp_path, [{"name": "vllm", "accelerator": {"type": "Ascend910B"}},
                                    {"name": "mindie", "engine": "mindie", "accelerator": {"type": "Ascend910B"}}],
                         weights)
    mixed = plan(config, "--nodes", "1x8:Ascend910B3+vllm,1x8:Ascend910B3+mindie+vllm")["backends"]
    assert mixed["qwen3-14b@vllm"]["placement"]["fits"] == mixed["qwen3-14b@mindie"]["placement"]["fits"] == "yes"
    only_vllm = plan(config, "--nodes", "2x8:Ascend910B3+vllm")["backends"]
    assert only_vllm["qwen3-14b@vllm"]["placement"]["fits"] == "yes"
    assert only_vllm["qwen3-14b@mindie"]["placement"]["fits"].startswith(
        "backend qwen3-14b@mindie needs a MindIE node: raystack.io/engine-mindie in 2.0,2.1,2.2,2.3,3.0, but no node "
        "offers it (nodes seen, with the engines they offer: 10.0.0.1: vLLM-Ascend 0.23; 10.0.0.2: vLLM-Ascend 0.23). "
        "To fix: start a node with `raystack start` in MindIE's image")
    bare = plan(config, "--nodes", "1x8:Ascend910B3")["backends"]["qwen3-14b@vllm"]["placement"]["fits"]
    assert "(nodes seen, with the engines they offer: 10.0.0.1: none)" in bare


def test_an_engine_no_node_can_be_labelled_with_is_refused_with_the_ones_that_can(tmp_path):
    done = subprocess.run([sys.executable, "-m", "raystack.cli", "plan", str(ROOT / "deploy_configs/qwen3.yaml"),
                           "--nodes", "2x8:Ascend910B3+sglang"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 1
    assert "sglang is not an engine a node is labelled with; +ENGINE is one of +vllm, +mindie" in done.stderr
