"""API keys from an environment variable stay where they are needed: the router reads them and withdraws the
variable; no backend replica, engine or MindIE daemon has them; no Ray log holds a key, good or bad.

The variable is in the environment Ray starts with, as it is on a cluster where it is exported before
`raystack start`: every Ray process inherits it, so a replica that forgot to withhold it would show it."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import httpx
import openai
import pytest
import ray

from tests.integration.conftest import deployed, synthetic
from tests.mindie_standin import install_mindie, model_weights
from tests.npu_nodes import engines_at, npu_node_args
from tests.serve_cluster import serve_cluster

KEYS_ENV = "RAYSTACK_TEST_SECRET_KEYS"
GOOD = f"sk-good-{secrets.token_hex(12)}"
BAD = f"sk-bad-{secrets.token_hex(12)}"
ASK = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    os.environ[KEYS_ENV] = GOOD  # before Ray starts: its raylet and every worker inherit it
    try:
        root = tmp_path_factory.mktemp("mindie")
        node = npu_node_args("910B3", 1, 65536, engines=engines_at(ascend_home=install_mindie(root / "image")))
        with serve_cluster(resources=node["resources"], labels=node["labels"]) as running:
            mindie = {"name": "mindie", "engine": "mindie", "max_model_len": 1024, "resources": {"cpus": 0.1},
                      "mindie": {"ascend_home": str(install_mindie(root)), "startup_timeout_s": 60},
                      "env": {"STANDIN_LOAD_S": "0"}}
            models = [{"name": "synthetic", "backends": [synthetic("s")]},
                      {"name": "mindie", "source": str(model_weights(root)), "backends": [mindie]}]
            with deployed(running.url, "secret", models, router={"api_keys": {"env": KEYS_ENV}}) as url:
                yield url
    finally:
        os.environ.pop(KEYS_ENV, None)


def processes() -> dict[int, tuple[str, bytes]]:
    """pid -> (command line, environment) of every process this user can read."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found[int(entry.name)] = ((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"),
                                          (entry / "environ").read_bytes())
            except OSError:
                continue  # gone, or not ours
    return found


def test_the_key_works_and_only_the_router_ever_held_it(app):
    for model in ("synthetic", "mindie"):
        good = openai.OpenAI(base_url=app, api_key=GOOD, max_retries=0, timeout=60)
        assert good.chat.completions.create(model=model, messages=ASK, max_tokens=3).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=app, api_key=BAD, max_retries=0).chat.completions.create(model=model, messages=ASK)
    assert httpx.get(f"{app}/models", headers={"Authorization": f"Bearer {BAD}"}).status_code == 401

    daemon = "mindie_standin_daemon"  # what the installed mindieservice_daemon execs
    ours = {pid: (command, env) for pid, (command, env) in processes().items()
            if command.startswith("ray::ServeReplica:secret") or daemon in command}
    kinds = {next(k for k in ("Router", "LLMServer-synthetic", "LLMServer-mindie", daemon) if k in command)
             for command, _ in ours.values()}
    assert kinds == {"Router", "LLMServer-synthetic", "LLMServer-mindie", daemon}
    holding = [command for command, env in ours.values() if GOOD.encode() in env]
    assert holding == [], f"these processes have the API key in their environment: {holding}"


def test_no_ray_log_holds_a_key(app):
    httpx.post(f"{app}/chat/completions", json={"model": "synthetic", "messages": ASK},
               headers={"Authorization": f"Bearer {BAD}"})
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    files = [path for path in logs.rglob("*") if path.is_file()]
    assert files
    leaked = [str(path) for path in files for key in (GOOD, BAD) if key.encode() in path.read_bytes()]
    assert leaked == []
