"""`raystack bench`: the same prompts against several targets, level by level, interleaved.

For each concurrency level: a warmup per target (not counted), then `rounds` rounds in which every
target gets the whole prompt set, in alternating order, so a machine that drifts (thermal, noisy
neighbours) hits every target alike. A target is a model name as the endpoint knows it; `model@backend`
pins one backend of a raystack model, which is how vLLM and MindIE are compared on one endpoint.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raystack.bench import report
from raystack.bench.datasets import Prompt
from raystack.bench.loadgen import API, Load, RequestResult, run_load


@dataclass(frozen=True)
class BenchSettings:
    base_url: str
    targets: list[str]
    concurrency: list[int]
    request_rate: float = float("inf")
    rounds: int = 1
    warmup: int = 1
    api: API = "chat"
    ignore_eos: bool = False
    api_key: str | None = None
    timeout_s: float = 600
    seed: int = 0


def run_bench(settings: BenchSettings, prompts: list[Prompt], out_dir: Path | None,
              progress: bool = True) -> list[dict[str, Any]]:
    """Run the benchmark; write results.{md,csv,json,png} into out_dir (when given); return the rows."""
    from tqdm import tqdm

    results: dict[tuple[str, int], list[RequestResult]] = {}
    durations: dict[tuple[str, int], float] = {}
    total = len(settings.concurrency) * len(settings.targets) * settings.rounds * len(prompts)
    with tqdm(total=total, unit="req", disable=not progress, dynamic_ncols=True) as bar:

        def run(target: str, level: int, batch: list[Prompt], count: bool) -> tuple[list[RequestResult], float]:
            bar.set_description(f"{target} c={level}" + ("" if count else " warmup"))
            load = Load(concurrency=level, request_rate=settings.request_rate, seed=settings.seed)
            return asyncio.run(run_load(
                settings.base_url, target, batch, load, api=settings.api, ignore_eos=settings.ignore_eos,
                api_key=settings.api_key, timeout_s=settings.timeout_s,
                on_done=(lambda _: bar.update()) if count else None,
            ))

        for level in settings.concurrency:
            for target in settings.targets:
                if settings.warmup:
                    run(target, level, prompts[:settings.warmup], count=False)
            for round_index in range(settings.rounds):
                order = settings.targets if round_index % 2 == 0 else settings.targets[::-1]
                for target in order:
                    batch, duration = run(target, level, prompts, count=True)
                    results.setdefault((target, level), []).extend(batch)
                    durations[target, level] = durations.get((target, level), 0.0) + duration

    rows = [report.summarize(target, level, results[target, level], durations[target, level])
            for level in settings.concurrency for target in settings.targets]
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.md").write_text(report.markdown(rows) + "\n")
        report.write_csv(rows, out_dir / "results.csv")
        recorded = {f"{target} c={level}": [dataclasses.asdict(r) for r in batch]
                    for (target, level), batch in results.items()}
        shown = dataclasses.asdict(settings) | {"api_key": "***" if settings.api_key else None,
                                                "prompts": len(prompts), "finished": time.strftime("%FT%T%z")}
        report.write_json(rows, recorded, shown, out_dir / "results.json")
        report.plot(rows, out_dir / "results.png")
    return rows
