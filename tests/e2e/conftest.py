"""The real stack, started once for the e2e tests: `serve run` on deploy_configs/local.yaml (Ray Serve, the
vLLM CPU engine, the embedded SmolLM2), on a free port. Tests drive it with the openai client. It stops
when the last e2e test is done (package scope), so its idle engine does not slow the rest of the suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from tests.serve_cluster import local_stack

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="package")
def stack(tmp_path_factory):
    with local_stack(tmp_path_factory.mktemp("stack")) as running:
        yield running


@pytest.fixture(scope="package")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack['base_url']}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="package")
def tokenizer():
    from transformers import AutoTokenizer

    from raystack.models.sources import locate

    return AutoTokenizer.from_pretrained(locate("smollm2-135m-instruct"))


def session_port(stack, kind: str) -> int:
    """A port of the Ray cluster `serve run` started (kind: gcs_server, metrics_export, ...): Ray names
    its session directory after the process that started it and records its ports there."""
    from ray._common.utils import get_default_ray_temp_dir

    sessions = Path(get_default_ray_temp_dir()).glob(f"session_*_{stack['proc'].pid}")
    session = max(sessions, key=lambda p: p.stat().st_mtime)
    return int(next(session.glob(f"{kind}_port_*")).read_text().strip())


def gcs_address(stack) -> str:
    import ray._private.services

    return f"{ray._private.services.get_node_ip_address()}:{session_port(stack, 'gcs_server')}"


class EngineWatch:
    """The load of one deployment's engine in the stack, read through a subprocess (tests/e2e/engine_stats.py)."""

    def __init__(self, stack, deployment: str):
        # serve run's local cluster requires Ray's token (~/.ray/auth_token), which a driver given an
        # address sends only in token mode.
        env = os.environ | {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.e2e.engine_stats", "--address", gcs_address(stack),
             "--app", "raystack.smollm2.vllm", "--deployment", deployment],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        if self.proc.stdout.readline().strip() != "ready":
            self.close()
            pytest.fail("could not connect to the stack's Ray cluster to read the engine's stats")

    def running(self, count: int, timeout_s: float = 60) -> dict:
        """The engine's stats once it runs `count` requests, or when timeout_s has passed."""
        self.proc.stdin.write(f"{count} {timeout_s}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
