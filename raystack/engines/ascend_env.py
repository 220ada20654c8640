"""CANN's environment: where the Ascend stack's set_env.sh scripts are, and whether this process has what the
two that vLLM Ascend needs (the CANN toolkit's and NNAL/ATB's) set.

vLLM Ascend runs in the replica's own process and its Ray workers, which inherit the environment `raystack
start` (so `ray start`) ran in: those two scripts must have been sourced there. vllm-ascend's image sources
/usr/local/Ascend/ascend-toolkit/set_env.sh and /usr/local/Ascend/nnal/atb/set_env.sh (vllm-ascend
Dockerfile), and its FAQ answers "Failed to infer device type" and "libatb.so: cannot open shared object
file" with sourcing them (docs/source/faqs.md); torch_npu, without CANN's libraries, says "Please run 'source
set_env.sh' in the CANN installation path" (Ascend/pytorch torch_npu/__init__.py). What they set, as CANN
9.1.0's images copy it into ENV lines (Ascend/cann-container-image cann/9.1.0-beta.3-910b-ubuntu22.04-py3.12/
Dockerfile; vllm-ascend 0.23 needs CANN 9.1.0): ASCEND_TOOLKIT_HOME, ASCEND_HOME_PATH (vllm-ascend's worker
reads it: vllm_ascend/worker/worker.py), ASCEND_OPP_PATH, the toolkit's lib64 and the NPU driver's
/usr/local/Ascend/driver/lib64{,/common,/driver} on LD_LIBRARY_PATH; NNAL's sets ATB_HOME_PATH and puts ATB's
lib on LD_LIBRARY_PATH. From CANN 8.5 a manual install may be under /usr/local/Ascend/cann/, with
cann/set_env.sh instead of ascend-toolkit/set_env.sh.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

DEFAULT_ASCEND_HOME = "/usr/local/Ascend"  # where Huawei's installers put the driver, CANN, NNAL, atb-models, MindIE
TOOLKIT_SCRIPTS = ("ascend-toolkit/set_env.sh", "cann/set_env.sh")  # the CANN toolkit's; cann/ from CANN 8.5
NNAL_ATB_SCRIPT = "nnal/atb/set_env.sh"
DRIVER_LIBRARY = "libascend_hal.so"  # the NPU driver's user-space library, in its lib64/driver


class CANNEnvironmentError(RuntimeError):
    """This process lacks CANN's environment; the message names what is missing and the scripts to source."""


def toolkit_script(home: str | Path) -> Path:
    """The CANN toolkit's set_env.sh under the Ascend home `home` (ascend-toolkit's unless only cann/'s is there)."""
    home = Path(home)
    return next((home / p for p in TOOLKIT_SCRIPTS if (home / p).is_file()), home / TOOLKIT_SCRIPTS[0])


def cann_scripts(home: str | Path) -> list[Path]:
    """The scripts that give a process CANN's environment, in the order to source them."""
    return [toolkit_script(home), Path(home) / NNAL_ATB_SCRIPT]


def missing_cann_environment(environ: Mapping[str, str]) -> list[str]:
    """What of CANN's environment `environ` lacks, one phrase each; empty if it has all of it."""
    missing = []
    for key in ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH"):
        value = environ.get(key)
        if not value:
            missing.append(f"{key} is not set")
        elif not Path(value).is_dir():
            missing.append(f"{key}={value} is not a directory")
    if not environ.get("ASCEND_OPP_PATH"):
        missing.append("ASCEND_OPP_PATH is not set")
    libraries = [Path(entry) for entry in environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if entry]
    toolkit = environ.get("ASCEND_HOME_PATH")
    if toolkit and Path(toolkit).is_dir() and not any(_same_dir(entry, Path(toolkit) / "lib64") for entry in libraries):
        missing.append(f"the toolkit's {Path(toolkit) / 'lib64'} is not on LD_LIBRARY_PATH")
    if not any((entry / DRIVER_LIBRARY).is_file() for entry in libraries):
        missing.append(f"the NPU driver's {DRIVER_LIBRARY} is in no directory of LD_LIBRARY_PATH (the toolkit's "
                       f"script adds the driver's lib64/driver)")
    if not environ.get("ATB_HOME_PATH"):
        missing.append("ATB_HOME_PATH is not set (NNAL's ATB)")
    return missing


def cann_environment_advice(missing: list[str], home: str | Path = DEFAULT_ASCEND_HOME) -> str:
    """What to do about `missing`: the exact scripts to source, found under the Ascend home `home`."""
    scripts = cann_scripts(home)
    if all(script.is_file() for script in scripts):
        source = " then ".join(map(str, scripts))
    else:
        source = (f"CANN's {TOOLKIT_SCRIPTS[0]} ({TOOLKIT_SCRIPTS[1]} from CANN 8.5) then {NNAL_ATB_SCRIPT} from where "
                  f"CANN and NNAL are installed (not found under {home}; install them as the README's \"On an "
                  f"Ascend NPU cluster\" says)")
    return (f"the environment raystack runs in on this node lacks CANN's, which vLLM Ascend (torch_npu) needs: "
            f"{'; '.join(missing)}. Source {source} before `raystack start` on this node (Ray's workers inherit the environment it "
            f"runs in): `ray stop`, source them, then `raystack start` again")


def cann_environment_problem(environ: Mapping[str, str], home: str | Path = DEFAULT_ASCEND_HOME) -> str | None:
    """What `environ` lacks of CANN's environment and the scripts to source (under `home`); None if nothing."""
    missing = missing_cann_environment(environ)
    return cann_environment_advice(missing, home) if missing else None


def require_cann_environment(environ: Mapping[str, str] | None = None, home: str | Path = DEFAULT_ASCEND_HOME) -> None:
    """CANNEnvironmentError unless `environ` (this process's by default) has CANN's environment."""
    problem = cann_environment_problem(os.environ if environ is None else environ, home)
    if problem:
        raise CANNEnvironmentError(problem)


def _same_dir(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)
