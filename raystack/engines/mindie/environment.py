"""The environment a mindieservice_daemon starts in.

1. The Ascend stack's own scripts, sourced in order as GPUStack does before it starts the daemon
   (gpustack/worker/backends/ascend_mindie.py, `_get_serving_command_script`: CANN toolkit, nnal/atb,
   atb-models, mindie). They set what MindIE's libraries need (ASCEND_HOME_PATH, ATB_HOME_PATH,
   ATB_SPEED_HOME_PATH, MINDIE_LLM_HOME_PATH, library and Python paths; MindIE-LLM
   docs/zh/user_guide/user_manual/environment_variable.md marks ATB_HOME_PATH and ATB_SPEED_HOME_PATH as
   required). Two guards while sourcing: `set --`, since a script sourced without arguments sees its
   caller's (mindie-llm's would take ours for `--backend=`); and an `rm` that keeps /dev/shm, since
   mindie-llm's set_env.sh runs `rm -rf /dev/shm/*` (MindIE-LLM scripts/set_env.sh), harmless in
   GPUStack's one-model containers and fatal on a shared Ray node, where /dev/shm holds Ray's object
   store and the other replicas' shared memory.
2. Variables inherited from the replica that would mislead the daemon are removed, as GPUStack removes
   them (ascend_mindie.py: NPU_VISIBLE_DEVICES, NPU_DEVICE_IDS, ASCEND_LAUNCH_BLOCKING,
   ASCEND_RT_VISIBLE_DEVICES, MIES_CONTAINER_MANAGEMENT_IP, WORLD_SIZE, RANKTABLEFILE, RANK_TABLE_FILE;
   on one node also MIES_CONTAINER_IP and HOST_IP).
3. The backend's `env` (its tuning, say what GPUStack sets: see deploy_configs/), then raystack's own keys.
4. On a replica over several nodes, what MindIE's rank-table guide requires (MindIE-LLM
   docs/zh/user_guide/user_manual/rank_table_file_configuration.md: MASTER_IP, MASTER_PORT,
   MIES_CONTAINER_IP, RANK_TABLE_FILE, HCCL_CONNECT_TIMEOUT in [120, 7200], and "unset http_proxy /
   https_proxy" or the nodes cannot talk: their link is gRPC, which honours those) and what GPUStack's
   multi-node MindIE sets (ATB_LLM_HCCL_ENABLE, ATB_LLM_COMM_BACKEND, HCCL_CONNECT_TIMEOUT=7200,
   HCCL_RDMA_PCIE_DIRECT_POST_NOSTRICT, HCCL_EXEC_TIMEOUT=0, HCCL_OP_EXPANSION_MODE=AIV except on 310P).

Before all of it, the replica's own Python is taken out of the environment the scripts and the daemon
inherit (without_replica_python). raystack runs in its virtualenv (the cluster's Python, 3.12 with vLLM
Ascend's stack); MindIE keeps its own Python (3.10/3.11 only: MindIE-LLM scripts/install.sh) and packages.
The daemon embeds that Python (llm_daemon.cpp: Py_Initialize) and execvp()s `mindie_llm_backend` through
PATH (src/executor/executor.cpp), a pip console script of MindIE's Python (setup.py); mindie-llm's
set_env.sh asks the first `python3` on PATH where torch is and puts that torch's libraries on
LD_LIBRARY_PATH (scripts/set_env.sh), and the scripts append to the PYTHONPATH they inherit (atb-models'
scripts/set_env.sh). So the venv's bin on PATH would hand them the venv's python3 and torch, and its
PYTHONPATH/PYTHONHOME would load the wrong Python's packages into the daemon.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from raystack.process import VISIBLE_NPUS_ENV

if TYPE_CHECKING:
    from raystack.engines.mindie.settings import MindIESettings

SOURCE_TIMEOUT_S = 120  # the atb-models script starts Python twice to find torch; a slow disk takes a while
KEEP_SHM = r'''rm() {
  for arg in "$@"; do
    case "$arg" in /dev/shm|/dev/shm/*) echo "raystack: kept /dev/shm (a sourced script ran: rm $*)" >&2; return 0;; esac
  done
  command rm "$@"
}'''
# Left by bash itself, not by the scripts.
_SHELL_VARIABLES = {"_", "SHLVL", "PWD", "OLDPWD"}
INHERITED_NOT_PASSED = ("NPU_VISIBLE_DEVICES", "NPU_DEVICE_IDS", "ASCEND_LAUNCH_BLOCKING", VISIBLE_NPUS_ENV,
                        "MIES_CONTAINER_MANAGEMENT_IP", "WORLD_SIZE", "RANKTABLEFILE", "RANK_TABLE_FILE",
                        "MIES_CONTAINER_IP", "HOST_IP", "MASTER_IP", "MASTER_PORT")
# The replica's Python, never MindIE's: VIRTUAL_ENV (what `activate` exports), PYTHONHOME, and PYTHONPATH,
# which on a Ray worker also holds what Ray puts there (a runtime_env's working_dir and py_modules: Ray's
# runtime_env/working_dir.py), all of it for raystack's Python. MindIE's scripts set the PYTHONPATH MindIE needs.
REPLICA_PYTHON_VARIABLES = ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH")
# Search paths that keep only their entries outside the replica's virtualenv: its bin (python3, pip3) and its
# packages' native libraries (torch's lib, exported for vLLM) would shadow MindIE's.
REPLICA_PYTHON_SEARCH_PATHS = ("PATH", "LD_LIBRARY_PATH")
PROXIES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "grpc_proxy", "all_proxy", "ALL_PROXY")


class MindIEEnvironmentError(RuntimeError):
    """A script MindIE needs is missing or failed; the message names it and what to do."""


def sourced_environment(scripts: list[str], base: dict[str, str]) -> dict[str, str]:
    """`base` as it is after sourcing `scripts` (each `PATH [ARGS]`) in one bash, in order."""
    lines = ["set --", KEEP_SHM]
    for entry in scripts:
        path, *args = shlex.split(entry)
        if not Path(path).is_file():
            raise MindIEEnvironmentError(
                f"{path} is missing: MindIE's libraries need the environment it sets. Install that part of the "
                f"Ascend stack on this node (CANN toolkit, NNAL/ATB, atb-models, MindIE), or point "
                f"mindie.ascend_home (or mindie.set_env_scripts) at where it is installed")
        lines.append(" ".join(["source", *map(shlex.quote, [path, *args])]))
    lines.append("env -0")
    try:
        done = subprocess.run(["bash", "-c", "\n".join(lines)], env=base, capture_output=True,
                              timeout=SOURCE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise MindIEEnvironmentError(f"sourcing {', '.join(scripts)} took over {SOURCE_TIMEOUT_S} s") from None
    if done.returncode != 0:
        raise MindIEEnvironmentError(f"sourcing {', '.join(scripts)} failed (exit {done.returncode}): "
                                     f"{done.stderr.decode(errors='replace').strip()[-500:]}")
    env = dict(item.split("=", 1) for item in done.stdout.decode(errors="replace").split("\0") if "=" in item)
    return {k: v for k, v in env.items() if k not in _SHELL_VARIABLES}


def replica_virtualenvs(environ: Mapping[str, str]) -> list[Path]:
    """The virtualenvs this replica's Python lives in: its own (sys.prefix differs from sys.base_prefix in a
    venv, PEP 405) and the one `activate` named in VIRTUAL_ENV."""
    found = [sys.prefix] if sys.prefix != sys.base_prefix else []
    found += [environ["VIRTUAL_ENV"]] if environ.get("VIRTUAL_ENV") else []
    return [Path(os.path.realpath(p)) for p in dict.fromkeys(found)]


def without_replica_python(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` without the replica's Python: its variables dropped, its virtualenvs' directories taken out of
    the search paths (module docstring: why MindIE must find its own)."""
    venvs = replica_virtualenvs(environ)

    def inside_a_venv(entry: str) -> bool:
        where = Path(os.path.realpath(entry or "."))
        return any(where == venv or venv in where.parents for venv in venvs)

    env = {k: v for k, v in environ.items() if k not in REPLICA_PYTHON_VARIABLES}
    for key in REPLICA_PYTHON_SEARCH_PATHS:
        if key in env:
            env[key] = os.pathsep.join(e for e in env[key].split(os.pathsep) if e and not inside_a_venv(e))
    return env


def own_env(settings: MindIESettings, install: Path, config_path: Path) -> dict[str, str]:
    """The keys raystack sets for every daemon."""
    return {
        "MIES_INSTALL_PATH": str(install),
        "MIES_CONFIG_JSON_PATH": str(config_path),
        "MIES_SERVICE_MONITOR_MODE": "1",  # Prometheus /metrics on the metrics port
        "NPU_MEMORY_FRACTION": f"{settings.npu_memory_fraction:g}",
        "OMP_NUM_THREADS": "1",
        "MINDIE_LOG_TO_STDOUT": "1",  # into the replica's log, through our pipe
        "PYTHONUNBUFFERED": "1",
    }


def multi_node_defaults(chip_family: str | None) -> dict[str, str]:
    """GPUStack's settings for a MindIE model over several nodes (the backend's env may tune them)."""
    env = {
        "ATB_LLM_HCCL_ENABLE": "1",
        "ATB_LLM_COMM_BACKEND": "hccl",
        "HCCL_CONNECT_TIMEOUT": "7200",
        "HCCL_RDMA_PCIE_DIRECT_POST_NOSTRICT": "TRUE",
        "HCCL_EXEC_TIMEOUT": "0",
    }
    if chip_family != "Ascend310P":  # GPUStack: the AIV expansion mode is not available on 310P
        env["HCCL_OP_EXPANSION_MODE"] = "AIV"
    return env


def daemon_env(settings: MindIESettings, backend_env: dict[str, str], own: dict[str, str],
               multi_node: dict[str, str] | None = None, chip_family: str | None = None) -> dict[str, str]:
    """The daemon's environment: this process's without its Python, the Ascend scripts', then the backend's
    `env`, then `own` (raystack's keys), and on a replica over several nodes `multi_node` (rank table, master,
    ports)."""
    env = sourced_environment(settings.scripts(), without_replica_python(os.environ))
    for key in INHERITED_NOT_PASSED:
        env.pop(key, None)
    if multi_node is not None:  # defaults first: the backend's env may tune them
        for key in PROXIES:
            env.pop(key, None)
        env.update(multi_node_defaults(chip_family))
    env.update(backend_env)
    env.update(own)
    env.update(multi_node or {})
    return env
