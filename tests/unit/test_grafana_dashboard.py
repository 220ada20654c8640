"""The shipped Grafana dashboard queries only metrics raystack exports."""

import json
import re
from pathlib import Path

import raystack.observability.metrics as metrics

ROOT = Path(__file__).resolve().parents[2]


def test_every_query_names_a_metric_raystack_exports():
    exported = set(re.findall(r'"(raystack_\w+)"', Path(metrics.__file__).read_text()))
    dashboard = json.loads((ROOT / "dashboards/grafana_raystack.json").read_text())
    queried = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"ray_(raystack_\w+)", target["expr"]):
                queried.add(re.sub(r"_(bucket|count|sum)$", "", name))
    assert queried and queried <= exported, queried - exported
    assert {"raystack_time_to_first_token_seconds", "raystack_time_per_output_token_seconds",
            "raystack_requests_running", "raystack_request_errors_total", "raystack_key_prompt_tokens_total",
            "raystack_key_completion_tokens_total", "raystack_key_requests_total", "raystack_prefix_cache_hits_total",
            "raystack_prefix_cache_queries_total", "raystack_kv_index_blocks", "raystack_queue_depth",
            "raystack_queue_wait_seconds", "raystack_requests_refused_total"} <= queried
