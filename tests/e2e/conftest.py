"""The real stack, started once per test session: `serve run` on deploy_configs/local.yaml (Ray Serve,
the vLLM CPU engine, the embedded SmolLM2), on a free port. Tests drive it with the openai client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from raystack.serving.fast_path import SERVE_FAST_PATH_ENV

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 900


def default_sigint() -> None:
    # A background job inherits SIGINT as ignored; serve run needs it to shut Serve and Ray down.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("stack")
    config = yaml.safe_load((ROOT / "deploy_configs/local.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    config_path = workdir / "local.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = workdir / "serve.log"
    serve = Path(sys.executable).with_name("serve")
    # Always a fresh local cluster, never one a developer has running.
    # As `make run` starts it: Serve's fast path for the Ray that serve run starts (proxy included).
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | SERVE_FAST_PATH_ENV
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(serve), "run", str(config_path)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            env=env, start_new_session=True, preexec_fn=default_sigint,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"serve run exited with {proc.returncode}:\n{log_path.read_text()[-5000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"stack not healthy after {STARTUP_TIMEOUT_S}s:\n{log_path.read_text()[-5000:]}")
            time.sleep(2)
        yield {"base_url": base, "log": log_path, "proc": proc}
    finally:
        proc.send_signal(signal.SIGINT)  # serve run shuts Serve and its local Ray cluster down
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack['base_url']}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from raystack.models.sources import locate

    return AutoTokenizer.from_pretrained(locate("smollm2-135m-instruct"))
