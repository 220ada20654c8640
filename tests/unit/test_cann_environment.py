"""A vLLM replica on NPUs checks CANN's environment before vLLM Ascend loads, and says which scripts to source.

The Ascend home is the stand-in (tests/mindie_standin.py): the NPU driver's library and the CANN toolkit's and
NNAL's set_env.sh scripts, which set what the real ones set; raystack sources them as it does MindIE's.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raystack.config import Backend
from raystack.engines.ascend_env import (CANNEnvironmentError, cann_environment_advice, cann_scripts,
                                         missing_cann_environment)
from raystack.engines.mindie.environment import sourced_environment
from raystack.engines.vllm.args import EngineArgsError
from raystack.engines.vllm.engine import VLLMEngine
from tests.mindie_standin import DRIVER_LIBRARY, install_cann

REPOSITORY = Path(__file__).resolve().parents[2]
CANN_KEYS = ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH", "ASCEND_OPP_PATH", "ATB_HOME_PATH", "LD_LIBRARY_PATH")
PLAIN = {"PATH": "/usr/bin:/bin"}  # a node's shell where nothing of CANN's was sourced


def sourced(home: Path, scripts: list[Path] | None = None) -> dict[str, str]:
    return sourced_environment([str(s) for s in (scripts or cann_scripts(home))], dict(PLAIN))


def test_the_sourced_scripts_give_everything_and_a_plain_shell_lacks_each_piece(tmp_path):
    home = install_cann(tmp_path)
    assert missing_cann_environment(sourced(home)) == []
    assert missing_cann_environment(PLAIN) == [
        "ASCEND_TOOLKIT_HOME is not set", "ASCEND_HOME_PATH is not set", "ASCEND_OPP_PATH is not set",
        "the NPU driver's libascend_hal.so is in no directory of LD_LIBRARY_PATH (the toolkit's script adds the "
        "driver's lib64/driver)", "ATB_HOME_PATH is not set (NNAL's ATB)"]


def test_each_missing_piece_is_named(tmp_path):
    home = install_cann(tmp_path)
    toolkit_only = sourced(home, cann_scripts(home)[:1])
    assert missing_cann_environment(toolkit_only) == ["ATB_HOME_PATH is not set (NNAL's ATB)"]
    env = sourced(home)
    lib64 = home / "ascend-toolkit/latest/lib64"
    without_lib64 = {**env, "LD_LIBRARY_PATH": env["LD_LIBRARY_PATH"].replace(f"{lib64}:", "")}
    assert missing_cann_environment(without_lib64) == [f"the toolkit's {lib64} is not on LD_LIBRARY_PATH"]
    moved = {**env, "ASCEND_HOME_PATH": str(tmp_path / "gone")}
    assert missing_cann_environment(moved) == [f"ASCEND_HOME_PATH={tmp_path / 'gone'} is not a directory"]
    (home / DRIVER_LIBRARY).unlink()  # the scripts ran, but no NPU driver is installed
    assert [m for m in missing_cann_environment(env) if "libascend_hal.so" in m]


def test_the_advice_names_the_scripts_under_the_ascend_home(tmp_path):
    home = install_cann(tmp_path)
    advice = cann_environment_advice(["ATB_HOME_PATH is not set (NNAL's ATB)"], home)
    assert (f"Source {home}/ascend-toolkit/set_env.sh then {home}/nnal/atb/set_env.sh before `raystack start` on "
            f"this node") in advice
    # CANN 8.5's manual install: cann/set_env.sh instead of ascend-toolkit's.
    (home / "cann").mkdir()
    (home / "ascend-toolkit/set_env.sh").rename(home / "cann/set_env.sh")
    assert f"Source {home}/cann/set_env.sh then {home}/nnal/atb/set_env.sh" in cann_environment_advice(["x"], home)
    nowhere = cann_environment_advice(["x"], tmp_path / "nowhere")
    assert f"from where CANN and NNAL are installed (not found under {tmp_path / 'nowhere'}" in nowhere


# The replica's start, in a process of its own: it fails on CANN's environment before vLLM or torch loads.
START_WITHOUT_CANN = """
import asyncio, json, sys
from pathlib import Path
from raystack.config import Backend
from raystack.engines.vllm.engine import VLLMEngine
engine = VLLMEngine("qwen3", Path(sys.argv[1]), Backend(name="vllm", device="npu"))
try:
    asyncio.run(engine.start())
except Exception as err:
    loaded = sorted(m for m in ("vllm", "vllm_ascend", "torch", "torch_npu") if m in sys.modules)
    print(json.dumps({"error": type(err).__name__, "message": str(err), "loaded": loaded}))
"""


def test_an_npu_replica_without_cann_environment_fails_before_vllm_loads(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in CANN_KEYS}
    env["PYTHONPATH"] = str(REPOSITORY)
    done = subprocess.run([sys.executable, "-c", START_WITHOUT_CANN, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=120, cwd=REPOSITORY)
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["error"] == "CANNEnvironmentError" and outcome["loaded"] == []
    assert "ASCEND_HOME_PATH is not set" in outcome["message"] and "ATB_HOME_PATH is not set" in outcome["message"]
    assert "/usr/local/Ascend" in outcome["message"] and "before `raystack start` on this node" in outcome["message"]


def test_an_npu_replica_with_cann_environment_goes_on_to_start_the_engine(tmp_path, monkeypatch):
    """With the sourced environment the check passes and the start goes on to vLLM's arguments, which here
    stop it: one vLLM does not know (no engine loads on this machine without NPUs)."""
    home = install_cann(tmp_path)
    backend = Backend(name="vllm", device="npu", engine_args={"not_a_vllm_argument": 1})
    for key in CANN_KEYS:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(CANNEnvironmentError):
        asyncio.run(VLLMEngine("qwen3", tmp_path, backend).start())
    env = sourced(home)
    for key in CANN_KEYS:
        monkeypatch.setenv(key, env[key])
    with pytest.raises(EngineArgsError, match="not_a_vllm_argument: not a vLLM engine argument"):
        asyncio.run(VLLMEngine("qwen3", tmp_path, backend).start())
