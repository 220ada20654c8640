"""A new engine is one file: tests/toy_engine.py, registered as an installed package registers one (an
entry point in the `raystack.engines` group, which tests/conftest.py puts on PYTHONPATH), is checked by
`raystack config check` and served by `serve run` through the router, with nothing else of raystack
changed; without the entry point, `config check` does not know it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.serve_cluster import free_port, own_ray_env, start_server, stop_server

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 180


def toy_config(port: int, source: Path, **toy: str) -> dict:
    (source / "config.json").write_text("{}")  # the toy engine's "checkpoint"
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {"name": "raystack", "route_prefix": "/", "import_path": "raystack.app:build_router", "args": {}},
            {"name": "raystack.parrot.toy", "route_prefix": None, "import_path": "raystack.app:build_backend",
             "args": {"model": {"name": "parrot", "source": str(source)},
                      "backend": {"name": "toy", "engine": "toy", "toy": toy}}},
        ],
    }


@pytest.fixture(scope="module")
def plugin_env() -> dict[str, str]:
    return own_ray_env()


def raystack(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("raystack")), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_config_check_knows_the_engine_and_applies_its_rules(plugin_env, tmp_path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(yaml.safe_dump(toy_config(8000, tmp_path, prefix="squawk:")))
    bad.write_text(yaml.safe_dump(toy_config(8000, tmp_path, prefix=" ")))
    assert raystack(plugin_env, "config", "check", str(good)).returncode == 0
    refused = raystack(plugin_env, "config", "check", str(bad))
    assert refused.returncode != 0 and "toy.prefix must not be blank" in refused.stderr
    unknown = raystack({**plugin_env, "PYTHONPATH": str(ROOT)}, "config", "check", str(good))
    assert unknown.returncode != 0 and "unknown engine 'toy'" in unknown.stderr


def test_serve_run_serves_the_new_engine_through_the_router(plugin_env, tmp_path):
    port = free_port()
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump(toy_config(port, tmp_path, prefix="squawk:")))
    base = f"http://127.0.0.1:{port}"
    proc = start_server([str(Path(sys.executable).with_name("serve")), "run", str(config)], tmp_path / "serve.log",
                        plugin_env, f"{base}/health", STARTUP_TIMEOUT_S, cwd=ROOT)
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=30)
        messages = [{"role": "user", "content": "polly wants a cracker"}]
        whole = client.chat.completions.with_raw_response.create(model="parrot", messages=messages)
        assert whole.headers["x-raystack-backend"] == "toy"
        assert whole.parse().choices[0].message.content == "squawk: polly wants a cracker"
        streamed = client.chat.completions.create(model="parrot", messages=messages, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == "squawk: polly wants a cracker"
        with pytest.raises(openai.BadRequestError, match="chat only"):
            client.completions.create(model="parrot", prompt="hello")
        assert httpx.get(f"{base}/v1/models").json()["data"][0]["backends"] == ["toy"]
    finally:
        stop_server(proc)
