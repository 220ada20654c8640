"""`raystack bench` against two synthetic backends of one model whose pace is known, pinned as
model@backend: what it reports must be what the engines were set to do."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import deployed, synthetic

PROMPTS, INPUT_WORDS, OUTPUT_TOKENS = 6, 20, 16
FAST = {"ttft_ms": 50, "tokens_per_s": 100}  # first token at 50 ms, then one per 10 ms
SLOW = {"ttft_ms": 200, "tokens_per_s": 25}  # 200 ms, then one per 40 ms


@pytest.fixture(scope="module")
def bench_run(server, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    backends = [synthetic("fast", **FAST), synthetic("slow", **SLOW)]
    with deployed(server, "bench", [{"name": "paced", "backends": backends}]) as url:
        done = subprocess.run(
            [str(Path(sys.executable).with_name("raystack")), "bench", "--base-url", url.removesuffix("/v1"),
             "--target", "paced@fast", "--target", "paced@slow", "--concurrency", "1,3",
             "--num-prompts", str(PROMPTS), "--input-len", str(INPUT_WORDS), "--output-len", str(OUTPUT_TOKENS),
             "--rounds", "2", "--warmup", "1", "--out-dir", str(out), "--no-progress"],
            capture_output=True, text=True, timeout=600,
        )
    assert done.returncode == 0, done.stdout + done.stderr
    return out, done.stdout, json.loads((out / "results.json").read_text())


def rows_of(report, target):
    return {row["concurrency"]: row for row in report["results"] if row["target"] == target}


def test_every_request_is_counted_with_the_servers_usage(bench_run):
    _, _, report = bench_run
    assert len(report["results"]) == 4  # 2 targets x 2 levels
    for row in report["results"]:
        assert (row["completed"], row["failed"]) == (2 * PROMPTS, 0)  # 2 rounds
        assert row["total_output_tokens"] == 2 * PROMPTS * OUTPUT_TOKENS
        assert row["total_input_tokens"] == 2 * PROMPTS * INPUT_WORDS  # a synthetic token is a word
    assert len(report["requests"]["paced@slow c=3"]) == 2 * PROMPTS


def test_reported_latencies_are_the_engines_pace(bench_run):
    _, _, report = bench_run
    # The pace is a floor (absolute deadlines in the engine); the serving path adds milliseconds, more of
    # them on a loaded 2-core machine, so the fast backend is also told from the slow one by order.
    for target, pace in (("paced@fast", FAST), ("paced@slow", SLOW)):
        interval_ms = 1000 / pace["tokens_per_s"]
        for row in rows_of(report, target).values():
            assert pace["ttft_ms"] <= row["ttft_median_ms"] < pace["ttft_ms"] + 300, row
            assert 0.8 * interval_ms <= row["tpot_median_ms"] < 2 * interval_ms, row
            assert 0.5 * interval_ms <= row["itl_median_ms"] < 2 * interval_ms, row
            expected_rate = OUTPUT_TOKENS / ((pace["ttft_ms"] + (OUTPUT_TOKENS - 1) * interval_ms) / 1000)
            assert 0.5 * expected_rate < row["per_request_tokens_per_s"] <= 1.05 * expected_rate, row
    for level, fast in rows_of(report, "paced@fast").items():
        assert fast["ttft_median_ms"] < rows_of(report, "paced@slow")[level]["ttft_median_ms"]


def test_outputs_table_csv_json_and_chart(bench_run):
    out, stdout, _ = bench_run
    assert "| paced@fast | 1 | 12 | 0 |" in stdout and "| paced@slow | 3 | 12 | 0 |" in stdout
    assert (out / "results.md").read_text().startswith("| target |")
    header = (out / "results.csv").read_text().splitlines()[0]
    assert header.startswith("target,concurrency,completed,failed") and "ttft_median_ms" in header
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_unknown_target_fails_with_the_servers_error(server, tmp_path):
    with deployed(server, "bench404", [{"name": "paced", "backends": [synthetic("fast", **FAST)]}]) as url:
        done = subprocess.run(
            [str(Path(sys.executable).with_name("raystack")), "bench", "--base-url", url.removesuffix("/v1"),
             "--target", "paced@mindie", "--num-prompts", "2", "--warmup", "0", "--out-dir", str(tmp_path),
             "--no-progress"],
            capture_output=True, text=True, timeout=300,
        )
    assert done.returncode == 1
    assert "HTTP 404" in done.stderr and "no backend `mindie`" in done.stderr
