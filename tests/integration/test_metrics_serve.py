"""raystack's metrics reach Prometheus through Ray's metrics agent, labelled by model, backend and
replica, and agree with the requests that were sent (synthetic engine: known token counts)."""

from __future__ import annotations

import time
import urllib.request

import openai
import ray

from tests.integration.conftest import deployed, synthetic
from tests.prometheus import parse_prometheus, total


def scrape() -> list[tuple[str, dict[str, str], float]]:
    """Every sample the node's Prometheus endpoint serves now."""
    port = ray.nodes()[0]["MetricsExportPort"]
    return parse_prometheus(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode())


def test_request_metrics_are_exported_per_model_backend_and_replica(server):
    backend = synthetic("synthetic", ttft_ms=50, tokens_per_s=100)
    with deployed(server, "metered", [{"name": "metered", "backends": [backend]}]) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=30)
        messages = [{"role": "user", "content": "four words of prompt"}]
        for _ in range(5):
            list(client.chat.completions.create(model="metered", messages=messages, max_tokens=10, stream=True))
        try:
            client.chat.completions.create(model="metered", messages=messages, max_tokens=10**6)
        except openai.BadRequestError:
            pass

        deadline = time.monotonic() + 90  # Ray's agent exports every few seconds; gauges follow health checks
        wanted = {"model": "metered", "backend": "synthetic"}
        while True:
            samples = scrape()
            done = (total(samples, "ray_raystack_time_to_first_token_seconds_count", **wanted) == 5
                    and total(samples, "ray_raystack_request_errors_total", model="metered") == 1
                    and total(samples, "ray_raystack_streams_total", model="metered") == 5
                    and any(n == "ray_raystack_requests_running" for n, _, _ in samples))
            if done or time.monotonic() > deadline:
                break
            time.sleep(2)

    assert total(samples, "ray_raystack_time_to_first_token_seconds_count", **wanted) == 5
    assert total(samples, "ray_raystack_e2e_request_latency_seconds_count", **wanted) == 5
    assert total(samples, "ray_raystack_time_per_output_token_seconds_count", **wanted) == 5
    assert total(samples, "ray_raystack_inter_token_latency_seconds_count", **wanted) == 5 * 9
    assert total(samples, "ray_raystack_generation_tokens_total", **wanted) == 50
    assert total(samples, "ray_raystack_prompt_tokens_total", **wanted) == 5 * 4
    # TTFT 50 ms: every observation lands in the (0.025, 0.05] bucket or the next, none below.
    assert total(samples, "ray_raystack_time_to_first_token_seconds_bucket", le="0.025", **wanted) == 0
    replicas = {l["replica"] for n, l, _ in samples if n == "ray_raystack_time_to_first_token_seconds_count"
                and l.get("model") == "metered"}
    assert len(replicas) == 1 and "" not in replicas
    assert total(samples, "ray_raystack_request_errors_total", model="metered", type="invalid_request_error",
                 status="400") == 1
    assert any(n == "ray_raystack_requests_running" and l.get("model") == "metered" for n, l, _ in samples)
    # The streams' chunks came straight from the replica (chunk channel), not through Serve's call: only a
    # stream that found no connection ready yet within 50 ms (the first) may have gone through Serve.
    assert total(samples, "ray_raystack_streams_total", model="metered", path="channel") >= 4
    assert total(samples, "ray_raystack_streams_total", model="metered") == 5
