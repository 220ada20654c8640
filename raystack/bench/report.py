"""Figures of a `raystack bench` run: one row per target and concurrency level, written as a markdown
table, CSV, JSON (rows and every request), and a PNG chart."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any

from raystack.bench.loadgen import RequestResult

# Columns of the table and the CSV, in order: (key, header).
COLUMNS = [
    ("target", "target"),
    ("concurrency", "concurrency"),
    ("completed", "ok"),
    ("failed", "failed"),
    ("output_throughput", "output tok/s"),
    ("request_throughput", "req/s"),
    ("ttft_median_ms", "TTFT p50 ms"),
    ("ttft_p99_ms", "TTFT p99 ms"),
    ("tpot_median_ms", "TPOT p50 ms"),
    ("itl_median_ms", "ITL p50 ms"),
    ("e2el_median_ms", "E2E p50 ms"),
    ("per_request_tokens_per_s", "tok/s per request"),
    ("reasoning_share", "reasoning share"),
    ("time_to_answer_median_ms", "to answer p50 ms"),
]


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default, as vllm bench serve reports)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _ms(values: list[float]) -> dict[str, float | None]:
    ms = [v * 1000 for v in values]
    return {"mean": statistics.fmean(ms) if ms else None, "median": percentile(ms, 50), "p99": percentile(ms, 99)}


def summarize(target: str, concurrency: int, results: list[RequestResult], duration_s: float) -> dict[str, Any]:
    """Aggregates over the requests of one target at one level (all rounds): throughputs are totals over
    the summed wall time of the runs."""
    ok = [r for r in results if r.ok]
    row: dict[str, Any] = {
        "target": target,
        "concurrency": concurrency,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": sum(r.input_tokens or 0 for r in ok),
        "total_output_tokens": sum(r.output_tokens for r in ok),
        "total_reasoning_tokens": sum(r.reasoning_tokens for r in ok),
        "request_throughput": len(ok) / duration_s if duration_s else None,
        "output_throughput": sum(r.output_tokens for r in ok) / duration_s if duration_s else None,
    }
    for name, values in (
        ("ttft", [r.ttft for r in ok if r.ttft is not None]),
        ("tpot", [r.tpot for r in ok if r.tpot is not None]),
        ("itl", [gap for r in ok for gap in r.itl]),
        ("e2el", [r.latency for r in ok]),
        ("time_to_answer", [r.time_to_answer for r in ok if r.time_to_answer is not None]),
    ):
        for stat, value in _ms(values).items():
            row[f"{name}_{stat}_ms"] = value
    # of the output tokens, the thinking: what a reasoning model spends before its answer
    row["reasoning_share"] = row["total_reasoning_tokens"] / row["total_output_tokens"] if row["total_output_tokens"] else None
    per_request = [r.tokens_per_s for r in ok if r.tokens_per_s is not None]
    row["per_request_tokens_per_s"] = statistics.fmean(per_request) if per_request else None
    row["errors"] = sorted({r.error for r in results if r.error})[:5]
    return row


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row[k]) for k, _ in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    keys = [k for k in rows[0] if k != "errors"] if rows else []
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_json(rows: list[dict[str, Any]], requests: dict[str, list[dict[str, Any]]], settings: dict[str, Any],
               path: Path) -> None:
    path.write_text(json.dumps({"settings": settings, "results": rows, "requests": requests}, indent=2))


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Four panels against concurrency, one line per target: output tok/s, TTFT, TPOT, tok/s per request."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    panels = [("output_throughput", "output tokens/s"), ("ttft_median_ms", "TTFT p50 (ms)"),
              ("tpot_median_ms", "TPOT p50 (ms)"), ("per_request_tokens_per_s", "tokens/s per request")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    targets = list(dict.fromkeys(row["target"] for row in rows))
    levels = sorted({row["concurrency"] for row in rows})
    for ax, (key, label) in zip(axes.flat, panels):
        for target in targets:
            points = [(r["concurrency"], r[key]) for r in rows if r["target"] == target and r[key] is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=target)
        ax.set_title(label)
        ax.set_xlabel("concurrent requests")
        ax.set_xticks(levels)
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle("raystack bench")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
