"""The third real stack, started after the others have stopped: two vLLM CPU replicas of the embedded model
routed kv_aware, behind a router on its own port. Two engines on 2 cores are slow but fit: 0.5 CPU each
(Ray's count), a small KV cache each, short answers."""

from __future__ import annotations

import pytest

from tests.integration.conftest import deployed
from tests.serve_cluster import serve_cluster

MODEL = "smollm2"


def kv_aware_model(replicas: int = 2) -> dict:
    return {
        "name": MODEL, "source": "smollm2-135m-instruct", "routing": {"policy": "kv_aware"},
        "backends": [{
            "name": "vllm", "engine": "vllm", "device": "cpu", "max_model_len": 2048,
            # 256 MiB of float32 KV cache: ~5,800 tokens, 45 blocks of 128 a replica
            "engine_args": {"dtype": "float32", "kv_cache_memory_bytes": 256 << 20},
            "resources": {"cpus": 0.5}, "autoscaling": {"min_replicas": replicas, "max_replicas": replicas},
        }],
    }


@pytest.fixture(scope="package")
def kv_stack():
    """The service's OpenAI base URL."""
    with serve_cluster() as cluster, deployed(cluster.url, "kv", [kv_aware_model()]) as url:
        yield url
