"""A MindIE Service installation for tests, laid out as Huawei's installers lay out /usr/local/Ascend: the
stand-in daemon (tests/mindie_standin_daemon.py) as mindie/latest/mindie-service/bin/mindieservice_daemon,
MindIE's shipped default conf/config.json (tests/fixtures/mindie), the NPU driver's library, and the four
set_env.sh scripts that GPUStack sources before the daemon, each setting the variables the real one sets that MindIE relies on
(as read from the real scripts: raystack/engines/mindie/environment.py cites them). Like the real
mindie-llm script, mindie/set_env.sh runs `rm -rf /dev/shm/*` and prints a usage line when given an
argument it does not know. raystack finds and runs all of it exactly as it would the real one."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import sys
from pathlib import Path

from tests import FIXTURES

DEFAULT_CONFIG = FIXTURES / "mindie" / "config.default.json"
DAEMON_SCRIPT = Path(__file__).with_name("mindie_standin_daemon.py")


# The CANN part of an Ascend home, as the real scripts set it (the toolkit's as CANN's images copy it into ENV
# lines: Ascend/cann-container-image cann/9.1.0-beta.3-910b-ubuntu22.04-py3.12/Dockerfile; the driver's
# directories are /usr/local/Ascend/driver/... there, the home's driver/ here). vLLM Ascend needs these two.
CANN_SET_ENV = {
    "ascend-toolkit/set_env.sh": 'export ASCEND_TOOLKIT_HOME="$HERE/latest"\nexport ASCEND_HOME_PATH="$ASCEND_TOOLKIT_HOME"\n'
                                 'export ASCEND_OPP_PATH="$ASCEND_TOOLKIT_HOME/opp"\n'
                                 'export ASCEND_AICPU_PATH="$ASCEND_TOOLKIT_HOME"\n'
                                 'export TOOLCHAIN_HOME="$ASCEND_TOOLKIT_HOME/toolkit"\n'
                                 'export PYTHONPATH="$ASCEND_TOOLKIT_HOME/python/site-packages:$PYTHONPATH"\n'
                                 'DRIVER="$(cd "$HERE/.." && pwd)/driver/lib64"\n'
                                 'export LD_LIBRARY_PATH="$ASCEND_TOOLKIT_HOME/lib64:$DRIVER:$DRIVER/common:$DRIVER/driver:'
                                 '$LD_LIBRARY_PATH"\n',
    "nnal/atb/set_env.sh": 'export ATB_HOME_PATH="$HERE/cxx_abi_0"\nexport ATB_WORKSPACE_MEM_ALLOC_ALG_TYPE=1\n'
                           'export LD_LIBRARY_PATH="$ATB_HOME_PATH/lib:$LD_LIBRARY_PATH"\n',
}
# MindIE's two: like the real mindie-llm script (MindIE-LLM scripts/set_env.sh), mindie's asks the first python3
# on PATH where its torch is and puts that torch's libraries on LD_LIBRARY_PATH (here without importing torch:
# where the interpreter's packages are), and both put their Python packages on the PYTHONPATH they inherit.
SET_ENV = CANN_SET_ENV | {
    "atb-models/set_env.sh": 'export ATB_SPEED_HOME_PATH="$HERE"\nexport TASK_QUEUE_ENABLE=1\n'
                             'export PYTHONPATH="$ATB_SPEED_HOME_PATH:$PYTHONPATH"\n',
    "mindie/set_env.sh": 'rm -rf /dev/shm/*\nexport MINDIE_LLM_HOME_PATH="$HERE/latest/mindie-llm"\n'
                         'export PYTORCH_INSTALL_PATH="$(python3 -c \'import sysconfig; print(sysconfig.get_paths()["purelib"] + "/torch")\')"\n'
                         'export LD_LIBRARY_PATH="$PYTORCH_INSTALL_PATH/lib:$LD_LIBRARY_PATH"\n'
                         'export PYTHONPATH="$MINDIE_LLM_HOME_PATH/lib:$MINDIE_LLM_HOME_PATH:$PYTHONPATH"\n'
                         'export MINDIE_LOG_TO_STDOUT=0\n'
                         'if [ -n "$1" ] && [ "${1#--backend=}" = "$1" ]; then echo "Usage: source set_env.sh --backend=<backend>"; '
                         'unset MINDIE_LLM_HOME_PATH; fi\n',
}
DRIVER_LIBRARY = "driver/lib64/driver/libascend_hal.so"  # the NPU driver's user-space library


# What MindIE 2.1.RC2's installer writes to mindie/latest/version.info (as printed by `cat` in the public
# MindIE 2.1.RC2 image notes; MindIE-LLM's install guide, step 8, has the same layout).
VERSION_INFO = """Ascend-mindie : MindIE 2.1.RC2.B080
mindie-rt: 2.1.RC2.B080
mindie-torch: 2.1.RC2.B080
mindie-service: 2.1.RC2.B080
mindie-llm: 2.1.RC2.B080
mindie-sd:2.1.RC2.B080
Platform : aarch64
"""


def install_cann(root: Path, scripts: dict[str, str] = CANN_SET_ENV) -> Path:
    """An Ascend home with the NPU driver's library, the CANN toolkit and NNAL (ATB) and their set_env.sh
    scripts under `root`; returns it."""
    home = root / "Ascend"
    for script, body in scripts.items():
        path = home / script
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f'HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"\n{body}')
    (home / "ascend-toolkit/latest/lib64").mkdir(parents=True)
    (home / "ascend-toolkit/latest/opp").mkdir()
    (home / DRIVER_LIBRARY).parent.mkdir(parents=True)
    (home / DRIVER_LIBRARY).write_bytes(b"")
    return home


def install_mindie(root: Path) -> Path:
    """An Ascend home (driver, CANN, NNAL, atb-models, MindIE) under `root`; returns it (mindie.ascend_home)."""
    home = install_cann(root, SET_ENV)
    install = home / "mindie" / "latest" / "mindie-service"
    (install / "bin").mkdir(parents=True)
    (install / "conf").mkdir()
    (install.parent / "version.info").write_text(VERSION_INFO)
    shutil.copy(DEFAULT_CONFIG, install / "conf" / "config.json")
    os.chmod(install / "conf" / "config.json", 0o640)
    daemon = install / "bin" / "mindieservice_daemon"
    # -I: the stand-in's own interpreter ignores PYTHON* variables, so it can say which of them reached it.
    daemon.write_text(f'#!/bin/sh\nexec "{sys.executable}" -I -u "{DAEMON_SCRIPT}" "$@"\n')
    daemon.chmod(daemon.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP)
    return home


def model_weights(root: Path, max_position_embeddings: int = 4096) -> Path:
    """A weight directory as MindIE expects one (its config.json is what the stand-in reads)."""
    weights = root / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    (weights / "config.json").write_text(json.dumps(  # a tiny Qwen3's shape: what raystack sizes its HBM need by
        {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
         "max_position_embeddings": max_position_embeddings, "torch_dtype": "bfloat16", "vocab_size": 151936,
         "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16}))
    weights.chmod(0o750)  # MindIE refuses a weight directory others may write
    return weights


def pids_started(control: Path) -> list[int]:
    """Every process a stand-in daemon recorded starting (itself and its backends)."""
    path = control / "pids"
    return [int(line.split()[0]) for line in path.read_text().splitlines()] if path.exists() else []


def starts(control: Path) -> list[dict]:
    """What each stand-in daemon saw when it started: its config.json (with its file mode), env and cwd."""
    folder = control / "started"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.exists() else []



def port_free(port: int, ip: str = "127.0.0.1") -> bool:
    """Nobody listens on it (connections the daemon closed may linger in TIME_WAIT, as servers allow)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
            s.listen()
            return True
        except OSError:
            return False


HCCN_FIXTURE = FIXTURES / "hccn_tool" / "ip_g_8card.txt"


def install_hccn_tool(folder: Path) -> Path:
    """A stand-in `hccn_tool` in `folder` (put it on PATH): `-i N -ip -g` answers from the published
    8-card capture; any other card id fails as the real tool does for a card that is not there."""
    folder.mkdir(parents=True, exist_ok=True)
    tool = folder / "hccn_tool"
    tool.write_text(f"""#!{sys.executable} -I
import re, sys
args = sys.argv[1:]
text = open({str(HCCN_FIXTURE)!r}).read()
if len(args) == 4 and args[0] == "-i" and args[2:] == ["-ip", "-g"]:
    m = re.search(r"hccn_tool -i " + re.escape(args[1]) + r" -ip -g\\n(ipaddr:.*\\nnetmask:.*\\n)", text)
    if m:
        print(m.group(1), end="")
        sys.exit(0)
print("devid " + (args[1] if len(args) > 1 else "?") + " is invalid", file=sys.stderr)
sys.exit(255)
""")
    tool.chmod(0o755)
    return tool
