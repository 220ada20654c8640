"""The HBM each NPU of a replica needs is known before placement, from hbm_gib, config.json (cached or fetched)
or the checkpoint's size on the hub; otherwise `serve run` (build_backend) and `raystack config check` refuse
with the fix. Hubs are the stand-in (tests/hub_standin.py, real HTTP for the real clients) or a closed port."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raystack.app import build_backend
from raystack.cluster.estimate import min_hbm_gib
from raystack.cluster.hbm_need import hbm_needs
from raystack.config import ConfigError, Model
from raystack.engines.vllm import GPU_MEMORY_UTILIZATION
from tests import FIXTURES, prime_model_configs
from tests.hub_standin import HubStandIn

ROOT = Path(__file__).resolve().parents[2]
QWEN3_14B = json.loads((FIXTURES / "model_configs/qwen3-14b.json").read_text())
CLOSED_PORT = "http://127.0.0.1:9"
GIB = 1024**3


@pytest.fixture
def offline(monkeypatch):
    """Both hubs at a closed port: what a machine without them sees, at once."""
    monkeypatch.setenv("HF_ENDPOINT", CLOSED_PORT)
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", CLOSED_PORT)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The stand-in hub serving Org/Qwen3-14B (config.json and weights) and Org/NoConfig (weights only), as
    Hugging Face and ModelScope alike."""
    with_config, weights_only = tmp_path / "with-config", tmp_path / "weights-only"
    for repo in (with_config, weights_only):
        repo.mkdir()
        (repo / "model-00001-of-00002.safetensors").write_bytes(os.urandom(3 * 1024 * 1024))
        (repo / "model-00002-of-00002.safetensors").write_bytes(os.urandom(1024 * 1024))
        (repo / "tokenizer.json").write_text("{}")
    (with_config / "config.json").write_text(json.dumps(QWEN3_14B))
    (weights_only / "training_args.bin").write_bytes(os.urandom(4096))  # not a weight file (vLLM skips it)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with HubStandIn({"Org/Qwen3-14B": with_config, "Org/NoConfig": weights_only}) as running:
        monkeypatch.setenv("HF_ENDPOINT", running.url)
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", running.url)
        yield running


def npu_model(source: str, **backend) -> Model:
    return Model(name="m", source=source, backends=[{"name": "vllm", "device": "npu", "max_model_len": 32768,
                                                     **backend}])


def need(source: str, cache: Path, **backend):
    return hbm_needs([npu_model(source, **backend)], cache)["m", "vllm"]


def test_a_config_json_in_the_cache_sizes_the_replica_by_the_estimate(tmp_path, offline):
    cache = prime_model_configs(tmp_path)
    found = need("modelscope://Qwen/Qwen3-14B", cache, parallelism={"tensor": 2})
    assert found.source == "config.json in the cache"
    assert found.gib == pytest.approx(min_hbm_gib(QWEN3_14B, 2, 1, 32768, memory_fraction=GPU_MEMORY_UTILIZATION))


def test_a_config_json_not_cached_is_fetched_from_the_hub_and_kept(tmp_path, hub):
    hub_name = "hf"  # the stand-in answers ModelScope's file list, not its file downloads
    found = need(f"{hub_name}://Org/Qwen3-14B", tmp_path)
    assert found.source == "config.json from the hub"
    assert found.gib == pytest.approx(min_hbm_gib(QWEN3_14B, 1, 1, 32768, memory_fraction=GPU_MEMORY_UTILIZATION))
    assert json.loads((tmp_path / "configs" / hub_name / "Org/Qwen3-14B/config.json").read_text()) == QWEN3_14B
    assert hub.downloads("Org/Qwen3-14B", "model-00001-of-00002.safetensors") == 0  # never the weights
    assert need(f"{hub_name}://Org/Qwen3-14B", tmp_path).source == "config.json in the cache"  # next time


@pytest.mark.parametrize("hub_name", ["hf", "modelscope"])
def test_without_config_json_the_weights_on_the_hub_size_it_split_over_tensor_x_pipeline(tmp_path, hub, hub_name):
    weights_gib = 4 * 1024 * 1024 / GIB  # the two shards; not training_args.bin nor tokenizer.json
    for tensor, pipeline in ((1, 1), (2, 2)):
        found = need(f"{hub_name}://Org/NoConfig", tmp_path, parallelism={"tensor": tensor, "pipeline": pipeline},
                     engine_args={"gpu_memory_utilization": 0.8})
        assert found.source == f"checkpoint size on the hub: {weights_gib:.3g} GiB of weights"
        # GPUStack's rule: weights x 1.2 shared by the NPUs, + 2 GiB each, within the engine's memory share.
        assert found.gib == pytest.approx((weights_gib * 1.2 / (tensor * pipeline) + 2) / 0.8)
    assert hub.downloads("Org/NoConfig", "model-00001-of-00002.safetensors") == 0


def test_hbm_gib_in_the_config_wins_and_asks_no_hub(tmp_path, offline):
    cache = prime_model_configs(tmp_path)
    found = need("modelscope://Qwen/Qwen3-14B", cache, hbm_gib=40)
    assert (found.gib, found.source) == (40, "hbm_gib in the config")
    assert need("modelscope://Org/Unknown", tmp_path, hbm_gib=20).gib == 20  # nothing cached, hub offline


def test_hbm_gib_applies_to_npu_backends_only():
    with pytest.raises(ConfigError, match="hbm_gib applies to device: npu only"):
        build_backend({"model": {"name": "m", "source": "modelscope://Org/Unknown"},
                       "backend": {"name": "vllm", "device": "cpu", "hbm_gib": 40}})


def test_serve_run_refuses_a_backend_whose_need_is_unknown_with_the_fix_at_once(tmp_path, offline):
    args = {"cache_dir": str(tmp_path), "model": {"name": "qwen3-32b", "source": "modelscope://Qwen/Qwen3-32B"},
            "backend": {"name": "vllm", "device": "npu", "parallelism": {"tensor": 2}}}
    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        build_backend(args)
    assert time.monotonic() - started < 10  # no retries against a hub that is not there
    message = str(err.value)
    assert "qwen3-32b@vllm: the HBM each NPU needs is unknown" in message
    assert "config.json of modelscope://Qwen/Qwen3-32B is not in the cache" in message
    assert f"ModelScope ({CLOSED_PORT}) is not reachable from this machine" in message
    assert "`raystack models prepare modelscope://Qwen/Qwen3-32B` on this node" in message
    assert str(tmp_path / "configs/modelscope/Qwen/Qwen3-32B/config.json") in message
    assert "set `hbm_gib:` in the backend" in message


def test_a_hub_without_weights_or_config_leaves_the_need_unknown(tmp_path, hub):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("nothing here")
    hub.repos["Org/Empty"] = empty
    found = need("hf://Org/Empty", tmp_path / "cache")
    assert found.gib is None and "no weight files (*.safetensors, *.bin, *.pt) on the hub" in found.source


def raystack(*args: str, cache: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raystack.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env={**os.environ, "RAYSTACK_CACHE_DIR": str(cache), **env})


def test_plan_of_a_shipped_config_on_a_fresh_offline_machine_says_what_it_cannot_tell_and_the_fix(tmp_path):
    started = time.monotonic()
    done = raystack("plan", "deploy_configs/qwen3.yaml", cache=tmp_path, MODELSCOPE_ENDPOINT=CLOSED_PORT)
    assert time.monotonic() - started < 60
    assert done.returncode == 1 and "Traceback" not in done.stderr
    planned = yaml.safe_load(done.stdout)["raystack"]  # the whole plan is still printed
    placement = planned["backends"]["qwen3-32b@vllm"]["placement"]
    assert placement["hbm_per_npu_gib"] == "unknown" and placement["fits"].startswith("unknown")
    assert "raystack models prepare modelscope://Qwen/Qwen3-32B" in placement["hbm_need_from"]
    assert "serve run would refuse qwen3-32b@vllm: the HBM each NPU needs is unknown" in done.stderr
    assert "set `hbm_gib:` in the backend" in done.stderr


def test_plan_and_config_check_name_where_each_need_came_from(tmp_path, hub):
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump({"applications": [
        {"name": "raystack", "import_path": "raystack.app:build_router", "args": {}},
        *({"name": f"raystack.{name}.vllm", "route_prefix": None, "import_path": "raystack.app:build_backend",
           "args": {"model": {"name": name, "source": source},
                    "backend": {"name": "vllm", "device": "npu", "max_model_len": 8192, **extra}}}
          for name, source, extra in (("fetched", "hf://Org/Qwen3-14B", {}), ("sized", "hf://Org/NoConfig", {}),
                                      ("given", "hf://Org/NoConfig", {"hbm_gib": 30}))),
    ]}))
    cache = tmp_path / "cache"
    planned = json.loads(raystack("plan", str(config), "--json", cache=cache).stdout)["raystack"]["backends"]
    assert planned["fetched@vllm"]["placement"]["hbm_need_from"] == "config.json from the hub"
    assert planned["sized@vllm"]["placement"]["hbm_need_from"].startswith("checkpoint size on the hub: ")
    assert planned["given@vllm"]["placement"]["hbm_need_from"] == "hbm_gib in the config"
    assert planned["given@vllm"]["placement"]["hbm_per_npu_gib"] == 30
    assert planned["given@vllm"]["placement"]["label_selector"] == {"raystack.io/npu-hbm-gib": "in(32,48,64,96,128,144,192,256)",
                                                                  "raystack.io/engine-vllm": "in(0.23,0.32)"}
    checked = raystack("config", "check", str(config), cache=cache)
    assert checked.returncode == 0, checked.stderr
    lines = checked.stdout.splitlines()
    assert any(line.startswith("  fetched@vllm: ") and line.endswith("(config.json in the cache)") for line in lines)
    assert any(line.startswith("  sized@vllm: ") and "(checkpoint size on the hub: " in line for line in lines)
    assert "  given@vllm: needs a vLLM-Ascend node: raystack.io/engine-vllm in 0.23,0.32; 30.0 GiB HBM per NPU " \
           "(hbm_gib in the config)" in lines


def test_config_check_refuses_offline_as_serve_run_would(tmp_path):
    done = raystack("config", "check", "deploy_configs/qwen3-14b.yaml", cache=tmp_path,
                    MODELSCOPE_ENDPOINT=CLOSED_PORT)
    assert done.returncode == 1
    assert "raystack cannot deploy this config" in done.stderr
    assert "qwen3-14b@vllm: the HBM each NPU needs is unknown" in done.stderr
    assert "`raystack models prepare modelscope://Qwen/Qwen3-14B` on this node" in done.stderr
