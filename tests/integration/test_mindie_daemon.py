"""One mindieservice_daemon under raystack's supervision, without Ray: start, readiness, refusals, stop,
and no orphan when the owner dies. The daemon is the stand-in (tests/mindie_standin_daemon.py), run
from a MindIE installation layout exactly as the real one would be."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import aiohttp
import pytest

from raystack.engines.mindie.config import MindIEPlan
from raystack.engines.mindie.daemon import MindIEDaemon, MindIEStartError
from raystack.engines.supervised import free_ports
from raystack.engines.mindie.settings import MindIESettings
from tests.mindie_standin import install_mindie, model_weights, pids_started, port_free, starts
from tests.processes import alive


@pytest.fixture
def mindie(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    home = install_mindie(tmp_path)
    control = tmp_path / "control"
    control.mkdir()
    monkeypatch.setenv("STANDIN_CONTROL", str(control))
    monkeypatch.setenv("STANDIN_LOAD_S", "0.5")
    return home, control, model_weights(tmp_path)


def free_port() -> int:
    return free_ports()[0]


def plan(weights: Path, port: int) -> MindIEPlan:
    return MindIEPlan(model_name="qwen3", weight_path=str(weights), npu_ids=[2, 3], port=port, max_seq_len=4096,
                      max_input_token_len=4096, max_batch_size=16, max_prefill_tokens=8192, max_iter_times=4096,
                      multi_nodes_infer_port=free_port())


async def run(daemon: MindIEDaemon, then=None):
    async with aiohttp.ClientSession() as session:
        try:
            await daemon.start(session, kill_grace_s=5)
            return await then(session) if then else None
        finally:
            await daemon.stop(session, drain_s=5, kill_grace_s=5)


def test_the_daemon_starts_from_the_written_config_and_stops_without_a_trace(mindie):
    home, control, weights = mindie
    port = free_port()
    daemon = MindIEDaemon(plan(weights, port), MindIESettings(ascend_home=str(home), npu_memory_fraction=0.85),
                          "mindieservice_daemon", {"ATB_WORKSPACE_MEM_ALLOC_ALG_TYPE": "3"})

    async def check(session):
        async with session.get(f"{daemon.url}/health") as r:
            assert r.status == 200
        assert daemon.config_path.stat().st_mode & 0o777 == 0o640
        return daemon.workdir

    workdir = asyncio.run(run(daemon, check))
    [seen] = starts(control)
    assert seen["mode"] == "640" and seen["cwd"] == str(workdir)  # writable, for its kernel_meta
    assert seen["env"]["MIES_INSTALL_PATH"] == str(home / "mindie/latest/mindie-service")
    assert seen["env"]["MIES_CONFIG_JSON_PATH"] == seen["config_path"]
    assert seen["env"]["MIES_SERVICE_MONITOR_MODE"] == "1" and seen["env"]["OMP_NUM_THREADS"] == "1"
    assert seen["env"]["NPU_MEMORY_FRACTION"] == "0.85" and seen["env"]["MINDIE_LOG_TO_STDOUT"] == "1"
    server = seen["config"]["ServerConfig"]
    assert server["port"] == server["managementPort"] == server["metricsPort"] == port
    assert server["httpsEnabled"] is False
    assert server["tokenTimeout"] == server["e2eTimeout"] == 3600  # in MindIE's ranges, which the stand-in checks
    # Stopped: every process it started is gone, its port is free, its config is removed.
    pids = pids_started(control)
    assert len(pids) == 3  # the daemon and a backend per NPU
    assert not [p for p in pids if alive(p)]
    assert port_free(port)
    assert not workdir.exists()


@pytest.mark.parametrize("server, words", [
    ({"httpsEnabled": True}, r"httpsEnabled is true"),
    ({"tokenTimeout": 3601}, r"serverConfig.tokenTimeout \[3601\] is out of bound \[3600\]"),
    ({"e2eTimeout": 0}, r"serverConfig.e2eTimeout \[0\] is less than \[1\]"),
])
def test_a_config_mindie_refuses_fails_the_start_with_its_words(mindie, server, words):
    home, control, weights = mindie
    settings = MindIESettings(ascend_home=str(home), overrides={"ServerConfig": server})
    daemon = MindIEDaemon(plan(weights, free_port()), settings, "mindieservice_daemon", {})
    with pytest.raises(MindIEStartError, match=r"did not start(.|\n)*killed by signal 9(.|\n)*" + words):
        asyncio.run(run(daemon))


def test_a_missing_installation_says_where_to_point(tmp_path):
    daemon = MindIEDaemon(plan(tmp_path, free_port()), MindIESettings(install_path=str(tmp_path / "nowhere")),
                          "mindieservice_daemon", {})
    with pytest.raises(MindIEStartError, match="run MindIE replicas on MindIE nodes .*set mindie.ascend_home"):
        asyncio.run(run(daemon))


def test_a_load_past_the_startup_timeout_is_stopped_and_explained(mindie, monkeypatch):
    home, control, weights = mindie
    monkeypatch.setenv("STANDIN_LOAD_S", "60")
    daemon = MindIEDaemon(plan(weights, free_port()), MindIESettings(ascend_home=str(home), startup_timeout_s=2),
                          "mindieservice_daemon", {})
    with pytest.raises(MindIEStartError, match=r"within mindie.startup_timeout_s \(2 s\)(.|\n)*loading qwen3"):
        asyncio.run(run(daemon))
    assert not [p for p in pids_started(control) if alive(p)]


def test_the_daemon_runs_in_the_ascend_scripts_environment_and_dev_shm_survives_them(mindie):
    """The four set_env.sh scripts are sourced (the stand-in refuses to start without what they set), the
    backend's env wins over what they set (their ATB_WORKSPACE_MEM_ALLOC_ALG_TYPE=1 against GPUStack's 3),
    and mindie's `rm -rf /dev/shm/*` removes nothing."""
    home, control, weights = mindie
    sentinel = Path("/dev/shm") / f"raystack-test-{os.getpid()}-{time.monotonic_ns()}"
    sentinel.write_text("Ray's object store and other replicas keep their shared memory here")
    try:
        daemon = MindIEDaemon(plan(weights, free_port()), MindIESettings(ascend_home=str(home)), "mindieservice_daemon",
                              {"ATB_WORKSPACE_MEM_ALLOC_ALG_TYPE": "3"})
        asyncio.run(run(daemon))
        assert sentinel.exists(), "a sourced script wiped /dev/shm"
    finally:
        sentinel.unlink(missing_ok=True)
    [seen] = starts(control)
    env = seen["env"]
    assert env["ASCEND_HOME_PATH"] == str(home / "ascend-toolkit/latest")
    assert (env["ATB_HOME_PATH"], env["ATB_SPEED_HOME_PATH"]) == (str(home / "nnal/atb/cxx_abi_0"), str(home / "atb-models"))
    assert env["MINDIE_LLM_HOME_PATH"] == str(home / "mindie/latest/mindie-llm")
    assert env["ATB_WORKSPACE_MEM_ALLOC_ALG_TYPE"] == "3" and env["TASK_QUEUE_ENABLE"] == "1"
    assert env["MINDIE_LOG_TO_STDOUT"] == "1"  # raystack's, over mindie's 0: the replica's log shows it


def test_a_missing_script_is_named_and_without_the_environment_mindie_does_not_start(mindie):
    home, control, weights = mindie
    (home / "nnal/atb/set_env.sh").unlink()
    daemon = MindIEDaemon(plan(weights, free_port()), MindIESettings(ascend_home=str(home)), "mindieservice_daemon", {})
    with pytest.raises(MindIEStartError, match=r"nnal/atb/set_env.sh is missing: MindIE's libraries need"):
        asyncio.run(run(daemon))
    only_toolkit = MindIESettings(ascend_home=str(home), set_env_scripts=[str(home / "ascend-toolkit/set_env.sh")])
    daemon = MindIEDaemon(plan(weights, free_port()), only_toolkit, "mindieservice_daemon", {})
    with pytest.raises(MindIEStartError, match="ATB_HOME_PATH is not set"):
        asyncio.run(run(daemon))


def test_the_daemon_runs_on_mindies_python_not_the_replicas_virtualenv(mindie, monkeypatch):
    """raystack runs in a virtualenv (this test's Python is one), activated as the README says before `raystack
    start`, whose workers inherit it; MindIE runs on its own Python. None of the venv's Python reaches the
    scripts or the daemon (the stand-in refuses, as MindIE fails, if it does), and the rest of PATH and
    LD_LIBRARY_PATH does."""
    assert sys.prefix != sys.base_prefix, "the tests run in a virtualenv (make test's .venv)"
    home, control, weights = mindie
    venv_bin = str(Path(sys.prefix) / "bin")
    venv_packages = sysconfig.get_paths()["purelib"]
    monkeypatch.setenv("VIRTUAL_ENV", sys.prefix)  # what `. .venv/bin/activate` exports
    monkeypatch.setenv("PATH", f"{venv_bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [venv_packages, os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("PYTHONHOME", sys.base_prefix)
    monkeypatch.setenv("LD_LIBRARY_PATH", f"{venv_packages}/torch/lib{os.pathsep}/opt/site/lib")
    daemon = MindIEDaemon(plan(weights, free_port()), MindIESettings(ascend_home=str(home)), "mindieservice_daemon", {})
    asyncio.run(run(daemon))
    [seen] = starts(control)
    env = seen["env"]
    assert env["VIRTUAL_ENV"] is None and env["PYTHONHOME"] is None
    # Only what the scripts put on PYTHONPATH: the toolkit's, atb-models' and mindie-llm's packages.
    assert all(Path(entry).is_relative_to(home) for entry in env["PYTHONPATH"].split(os.pathsep) if entry)
    assert venv_bin not in env["PATH"].split(os.pathsep) and "/usr/bin" in env["PATH"].split(os.pathsep)
    python3 = shutil.which("python3", path=env["PATH"])
    assert python3 and not Path(os.path.realpath(python3)).is_relative_to(os.path.realpath(sys.prefix))
    # mindie-llm's script found torch through that python3, not the venv's.
    assert not Path(env["PYTORCH_INSTALL_PATH"]).is_relative_to(sys.prefix)
    libraries = env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert "/opt/site/lib" in libraries and not [e for e in libraries if e.startswith(sys.prefix)]


OWNER = textwrap.dedent("""
    import asyncio, sys
    from raystack.engines.supervised import SupervisedProcess

    async def main():
        child = SupervisedProcess("sleeper", ["sh", "-c", "sleep 300 & echo $!; sleep 300"], {"PATH": "/usr/bin:/bin"})
        await child.start()
        print(child.pid, flush=True)
        await asyncio.sleep(300)

    asyncio.run(main())
""")


def test_the_group_dies_with_its_owner_even_on_sigkill(tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[2])
    leader = int(owner.stdout.readline())
    deadline = time.monotonic() + 10
    while not [p for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid(int(p.name)) == leader][1:]:
        assert time.monotonic() < deadline, "the child did not start its grandchild"
        time.sleep(0.1)
    group = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid(int(p.name)) == leader]
    assert len(group) >= 2
    os.kill(owner.pid, signal.SIGKILL)  # no finally, no atexit: only the guard can clean up
    owner.wait()
    deadline = time.monotonic() + 10
    while [p for p in group if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in group if alive(p)], "the supervised group outlived its owner"


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
