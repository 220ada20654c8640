#!/usr/bin/env python
"""Do `raystack bench` and `vllm bench serve` agree? Both load one endpoint (raystack serving the embedded
SmolLM2 on the vLLM CPU engine, started here) with the same workload, in alternating rounds; the table
gives each one's output throughput and median TTFT and their ratio.

    .venv/bin/python scripts/bench_agreement.py --rounds 3 --concurrency 6 --num-prompts 24
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench_vs_vllm import MODEL, dtype_of, embedded_default, start, stop  # noqa: E402  (that benchmark's stack start-up)


def vllm_bench(base: str, tokenizer: Path, args, concurrency: int, seed: int, run_dir: Path) -> dict:
    out = run_dir / "vllm-bench-serve.json"
    subprocess.run(
        [str(BIN / "python"), str(ROOT / "scripts/vllm_bench_serve.py"), "--backend", "openai-chat",
         "--base-url", base, "--endpoint", "/v1/chat/completions", "--model", MODEL, "--tokenizer", str(tokenizer),
         "--dataset-name", "random", "--random-input-len", str(args.input_len),
         "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
         "--max-concurrency", str(concurrency), "--ignore-eos", "--seed", str(seed),
         "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name],
        check=True, stdout=subprocess.DEVNULL, cwd=ROOT,
    )
    result = json.loads(out.read_text())
    return {"output_throughput": result["output_throughput"], "median_ttft_ms": result["median_ttft_ms"]}


def raystack_bench(base: str, tokenizer: Path, args, concurrency: int, seed: int, run_dir: Path) -> dict:
    subprocess.run(
        [str(BIN / "raystack"), "bench", "--base-url", base, "--target", MODEL, "--tokenizer", str(tokenizer),
         "--dataset", "random", "--input-len", str(args.input_len), "--output-len", str(args.output_len),
         "--num-prompts", str(args.num_prompts), "--concurrency", str(concurrency), "--ignore-eos",
         "--seed", str(seed), "--warmup", "1", "--out-dir", str(run_dir), "--no-progress"],
        check=True, stdout=subprocess.DEVNULL, cwd=ROOT,
    )
    [row] = json.loads((run_dir / "results.json").read_text())["results"]
    return {"output_throughput": row["output_throughput"], "median_ttft_ms": row["ttft_median_ms"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "bench_results"))
    args = parser.parse_args()

    model_path, backend = embedded_default()
    outdir = Path(args.out) / datetime.now().strftime("agreement-%Y%m%d-%H%M%S")
    outdir.mkdir(parents=True)
    tools = {"vllm bench serve": vllm_bench, "raystack bench": raystack_bench}
    runs: dict[str, list[dict]] = {name: [] for name in tools}

    proc, base = start("raystack", model_path, backend, outdir)
    try:
        for rnd in range(args.rounds):
            order = list(tools) if rnd % 2 == 0 else list(tools)[::-1]
            for name in order:
                run_dir = outdir / f"{name.split()[0]}-r{rnd}"
                run_dir.mkdir()
                # A new seed each round: prompts the engine's prefix cache has not seen, for both tools alike.
                result = tools[name](base, model_path, args, args.concurrency, rnd, run_dir)
                runs[name].append(result)
                print(f"round {rnd + 1}: {name}: {result['output_throughput']:.2f} tok/s, "
                      f"median TTFT {result['median_ttft_ms']:.0f} ms", flush=True)
    finally:
        stop(proc)

    def mean(name: str, key: str) -> float:
        return statistics.mean(r[key] for r in runs[name])

    lines = [
        f"Same endpoint (raystack, {MODEL}: SmolLM2-135M {dtype_of(backend)} on the vLLM CPU engine), random {args.input_len} in / "
        f"{args.output_len} out, --ignore-eos, {args.num_prompts} prompts at concurrency {args.concurrency}, "
        f"{args.rounds} alternating rounds; means over rounds.",
        "",
        "| tool | output tok/s | median TTFT ms | per round (tok/s) |",
        "|---|---|---|---|",
    ]
    for name in tools:
        per_round = ", ".join(f"{r['output_throughput']:.2f}" for r in runs[name])
        lines.append(f"| {name} | {mean(name, 'output_throughput'):.2f} | {mean(name, 'median_ttft_ms'):.0f} | {per_round} |")
    ours, theirs = "raystack bench", "vllm bench serve"
    lines += ["", f"raystack bench / vllm bench serve: output throughput "
                  f"{mean(ours, 'output_throughput') / mean(theirs, 'output_throughput'):.3f}x, median TTFT "
                  f"{mean(ours, 'median_ttft_ms') / mean(theirs, 'median_ttft_ms'):.3f}x"]
    summary = "\n".join(lines)
    (outdir / "summary.md").write_text(summary + "\n")
    print("\n" + summary + f"\n\nraw results: {outdir}")


if __name__ == "__main__":
    main()
