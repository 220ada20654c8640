"""`raystack start --dry-run`, `raystack estimate` and `parallelism: auto`, run as a user runs them:
the real CLI in a subprocess, with a stand-in npu-smi on PATH (published npu-smi outputs)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from raystack.engines.ascend_env import cann_scripts
from raystack.engines.mindie.environment import sourced_environment
from tests.mindie_standin import install_cann
from tests.npu_nodes import vllm_ascend_site
from tests.npu_smi_standin import StandIn, fixture

ROOT = Path(__file__).resolve().parents[2]
MODEL_CONFIGS = ROOT / "tests/fixtures/model_configs"


def raystack(*args: str, path_dir: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env)
    # Only the stand-in (if any) and the interpreter's own directory: no real npu-smi can sneak in.
    env["PATH"] = os.pathsep.join(filter(None, [str(path_dir) if path_dir else None, str(Path(sys.executable).parent), "/usr/bin", "/bin"]))
    return subprocess.run([sys.executable, "-m", "raystack.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT)


def test_start_registers_8_x_910b3_with_the_vllm_ascend_env(tmp_path):
    StandIn(tmp_path / "bin", {"info": fixture("info_910b3_8card.txt"), "info -m": fixture("info_m_910b_8card.docsample.txt")})
    out = raystack("start", "--head", "--ifname", "lo", "--dry-run", path_dir=tmp_path / "bin")
    assert out.returncode == 0, out.stderr
    command = out.stdout.strip().splitlines()[-1]
    resources = json.loads(command.split("--resources=", 1)[1].split("'")[0])
    assert resources == {"NPU": 8, "accelerator_type:Ascend910B3": 1}
    assert ("--labels=ray.io/accelerator-type=Ascend910B3,raystack.io/npu-family=Ascend910B,"
            "raystack.io/npu-hbm-gib=64") in command
    for line in ["export ASCEND_RT_VISIBLE_DEVICES=0,1,2,3,4,5,6,7", "export HCCL_IF_IP=127.0.0.1",
                 "export GLOO_SOCKET_IFNAME=lo", "export TP_SOCKET_IFNAME=lo",
                 "export RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES=1", "export RAY_worker_niceness=0",
                 "export RAY_SERVE_CONTROL_LOOP_INTERVAL_S=0.5"]:
        assert line in out.stdout
    assert "--head --port=6379" in command


def test_start_leaves_out_an_unhealthy_chip_and_says_why(tmp_path):
    StandIn(tmp_path / "bin", {"info": fixture("info_310p3_duo_4card_critical.txt")})
    out = raystack("start", "--address", "127.0.0.1:6379", "--dry-run", path_dir=tmp_path / "bin")
    assert out.returncode == 0, out.stderr
    assert '"NPU":7' in out.stdout and "accelerator_type:Ascend310P3" in out.stdout
    # 310P memory varies by card: the label is the smallest chip's size rounded up to a tier (43693 MB -> 48)
    assert "raystack.io/npu-family=Ascend310P,raystack.io/npu-hbm-gib=48" in out.stdout
    assert "left out NPU 4 chip 0: health Critical" in out.stdout
    assert "export ASCEND_RT_VISIBLE_DEVICES=0,1,2,3,5,6,7" in out.stdout
    assert "export GLOO_SOCKET_IFNAME=lo" in out.stdout  # the interface that routes to the head


def test_a_node_without_npus_joins_as_a_cpu_node_with_a_notice(tmp_path):
    out = raystack("start", "--address", "127.0.0.1:6379", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "no Ascend NPU found on this node: it joins as a CPU-only node" in out.stdout
    assert '--resources={"NPU":0}' in out.stdout and "ASCEND_RT_VISIBLE_DEVICES" not in out.stdout


def test_declared_npus_for_simulation():
    out = raystack("start", "--head", "--npus", "4", "--npu-type", "Ascend910B4", "--hbm-gib", "32", "--dry-run")
    assert '"NPU":4,"accelerator_type:Ascend910B4":1' in out.stdout
    assert "raystack.io/npu-family=Ascend910B,raystack.io/npu-hbm-gib=32" in out.stdout


def test_head_and_address_are_exclusive():
    out = raystack("start", "--head", "--address", "h:6379", "--dry-run")
    assert out.returncode != 0 and "not allowed with argument" in out.stderr


def test_estimate_prints_the_npus_a_replica_needs(tmp_path):
    model = tmp_path / "qwen3-32b"
    model.mkdir()
    shutil.copy(MODEL_CONFIGS / "qwen3-32b.json", model / "config.json")
    out = raystack("estimate", str(model), "--max-model-len", "32768")
    assert out.returncode == 0, out.stderr
    assert "parallelism  tensor 2 x pipeline 1 = 2 NPUs per replica" in out.stdout
    small = raystack("estimate", str(model), "--npu-type", "Ascend910B4", "--json")
    assert json.loads(small.stdout)["tensor_parallel"] == 4
    missing = raystack("estimate", str(tmp_path / "nothing-here"))
    assert missing.returncode == 1 and "error:" in missing.stderr


def test_parallelism_auto_is_resolved_by_the_estimate(tmp_path, capsys):
    model = tmp_path / "qwen3-32b"
    model.mkdir()
    shutil.copy(MODEL_CONFIGS / "qwen3-32b.json", model / "config.json")
    config = yaml.safe_load((ROOT / "deploy_configs/qwen3.yaml").read_text())
    args = config["applications"][1]["args"]
    args["model"]["source"] = str(model)
    args["backend"]["parallelism"] = "auto"
    path = tmp_path / "auto.yaml"
    path.write_text(yaml.safe_dump(config))
    from raystack.cli import main  # in this process: vLLM, which config check imports, loads once

    assert main(["config", "check", str(path)]) == 0, capsys.readouterr().err
    assert "qwen3-32b@vllm: parallelism auto -> tensor 2 x pipeline 1" in capsys.readouterr().out


def test_start_warns_when_vllm_ascend_is_installed_but_cann_environment_is_not_sourced(tmp_path):
    """vLLM Ascend's replicas inherit the environment `raystack start` runs in: it says so before they fail."""
    StandIn(tmp_path / "bin", {"info": fixture("info_910b3_8card.txt"), "info -m": fixture("info_m_910b_8card.docsample.txt")})
    site = vllm_ascend_site(tmp_path / "site")  # vllm-ascend as Python finds it installed (its metadata)
    plugin = site / "vllm_ascend"
    plugin.mkdir()
    (plugin / "__init__.py").write_text("raise SystemExit('raystack start must not import vllm_ascend')\n")
    home = install_cann(tmp_path)
    cann = ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH", "ASCEND_OPP_PATH", "ATB_HOME_PATH", "LD_LIBRARY_PATH")
    plain = {k: v for k, v in os.environ.items() if k not in cann}
    plain["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(site)])
    out = raystack("start", "--head", "--ifname", "lo", "--dry-run", path_dir=tmp_path / "bin", env=plain)
    assert out.returncode == 0, out.stderr
    assert "raystack: warning: vLLM-Ascend is installed, but the environment raystack runs in on this node lacks " \
           "CANN's" in out.stdout
    assert "ATB_HOME_PATH is not set" in out.stdout and "before `raystack start` on this node" in out.stdout
    sourced = sourced_environment([str(s) for s in cann_scripts(home)], plain)
    out = raystack("start", "--head", "--ifname", "lo", "--dry-run", path_dir=tmp_path / "bin", env=sourced)
    assert out.returncode == 0, out.stderr
    assert "warning" not in out.stdout and "8 x Ascend910B3 registered" in out.stdout
    assert "label raystack.io/engine-vllm=" in out.stdout  # the series of the first vLLM on its path
