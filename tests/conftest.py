"""Test-wide settings. Tests never reach beyond this machine: telemetry and usage reports of the
libraries underneath (Hugging Face Hub, vLLM, Ray) are off before any of them is imported, and the
servers the tests start inherit this environment.

The toy engine (tests/toy_engine.py) is registered for the whole session the way an installed package
registers an engine: an entry point in the `raystack.engines` group, here from a dist-info folder put on
this process's path before raystack is imported, and on PYTHONPATH for every process the tests start
(`serve run`, the CLI, Ray's workers)."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from raystack.process import LOCAL_RAY_ENV  # noqa: E402  (it imports os and logging only)

for key, value in {
    "HF_HUB_DISABLE_TELEMETRY": "1",  # else huggingface_hub fetches an agent registry from its hub
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    **LOCAL_RAY_ENV,  # as the Makefile and `raystack start` run Ray, less Serve's fast path
}.items():
    os.environ[key] = value

PLUGIN_SITE = Path(tempfile.mkdtemp(prefix="raystack-test-plugins-"))
atexit.register(shutil.rmtree, PLUGIN_SITE, ignore_errors=True)
_info = PLUGIN_SITE / "raystack_toy_engine-0.1.dist-info"
_info.mkdir()
(_info / "METADATA").write_text("Metadata-Version: 2.1\nName: raystack-toy-engine\nVersion: 0.1\n")
(_info / "entry_points.txt").write_text("[raystack.engines]\ntoy = tests.toy_engine:ENGINE\n")
sys.path.insert(0, str(PLUGIN_SITE))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(PLUGIN_SITE), str(ROOT), os.environ.get("PYTHONPATH")) if p)
