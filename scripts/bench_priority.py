#!/usr/bin/env python
"""Interactive before batch: chat TTFT beside batch work, with priority classes against first come first served.

One vLLM CPU replica of the embedded model, limited to `--max-num-seqs` running sequences (4), behind one
router with API keys from a file: key `chat` and key `jobs`. `--batch-streams` batch clients (8) ask one long
answer after another (`--batch-tokens`, streamed; a 429 waits its Retry-After, then asks again), and chat
requests come at fixed-seed Poisson arrivals of `--rate` per second (open loop), each a short prompt and a
short answer. Phases, each with the same chat requests at the same times:

  idle      chat alone: the floor
  fcfs      both keys in the default class (standard): one queue, first come first served, in the router and
            in vLLM's scheduler; what every raystack served before priority classes
  priority  key chat in class interactive, key jobs in class batch (sheddable, at most `--batch-share` of
            the running sequences)

The phases switch by rewriting the keys file, which the router reads again within seconds (checked on each
answer's x-raystack-priority header): the engine and its cache stay the same. Batch work starts
`--settle-s` before the chat requests and runs until the last chat answer is in; fcfs and priority alternate
order each round.

Reported per phase (means over rounds, and each round's p90): chat TTFT p50 / p90 (to the first content
token, as the client sees it), chat errors and 429s (target: none), batch output tokens/s over the chat
requests' span, and batch 429s. Targets (issue #30): chat p90 with classes at most 2x idle's and at most a
third of fcfs's.

    .venv/bin/python scripts/bench_priority.py --rounds 2

Results go to bench_results/priority-<time>.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raystack.bench.datasets import random_prompts  # noqa: E402
from raystack.bench.loadgen import request_body, send  # noqa: E402
from raystack.bench.report import percentile  # noqa: E402

MODEL = "smollm2"
SOURCE = "smollm2-135m-instruct"
APP = "priobench"
CLASSES = {"fcfs": {"chat": None, "jobs": None}, "priority": {"chat": "interactive", "jobs": "batch"}}


def keys_file(classes: dict[str, str | None]) -> str:
    lines = ["keys:"]
    for name, priority in classes.items():
        lines += [f"  - name: {name}", f"    key: sk-{name}"] + ([f"    priority: {priority}"] if priority else [])
    return "\n".join(lines) + "\n"


def stack(keys: Path, max_num_seqs: int, port: int, batch_share: float) -> dict[str, Any]:
    backend = {
        "name": "vllm", "engine": "vllm", "device": "cpu", "max_model_len": 2048,
        "engine_args": {"dtype": "float32", "max_num_seqs": max_num_seqs},
        "resources": {"cpus": 1}, "autoscaling": {"min_replicas": 1, "max_replicas": 1},
    }
    return {"models": [{"name": MODEL, "source": SOURCE, "backends": [backend]}],
            "router": {"api_keys": {"file": str(keys)}, "port": port, "priority": {"classes": [
                {"name": "interactive"}, {"name": "standard"},
                {"name": "batch", "sheddable": True, "max_share": batch_share}]}}}


class Batch:
    """`streams` clients of key jobs, each asking one long answer after another until stopped."""

    def __init__(self, session: aiohttp.ClientSession, url: str, streams: int, tokens: int, seed: int):
        self.done: list[tuple[float, int]] = []  # (end time, output tokens) of each whole answer
        self.refused = 0
        self.errors: list[str] = []
        prompts = random_prompts(streams * 1000, 200, tokens, seed=seed)
        self.tasks = [asyncio.create_task(self._client(session, url, prompts[i::streams])) for i in range(streams)]

    async def _client(self, session: aiohttp.ClientSession, url: str, prompts: list) -> None:
        for prompt in prompts:
            result = await send(session, url, request_body("chat", MODEL, prompt, True), "chat",
                                {"Authorization": "Bearer sk-jobs"})
            if result.status == 429:
                self.refused += 1
                await asyncio.sleep(float(result.headers.get("retry-after", 1)))
            elif result.ok:
                self.done.append((time.perf_counter(), result.output_tokens))
            else:
                self.errors.append(result.error or "?")

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def tokens_per_s(self, start: float, end: float) -> float:
        return sum(tokens for t, tokens in self.done if start <= t <= end) / (end - start)


async def chat(session: aiohttp.ClientSession, url: str, plan: list[tuple[float, Any]]) -> list[dict[str, Any]]:
    t0 = time.perf_counter()

    async def at(when: float, prompt: Any) -> dict[str, Any]:
        await asyncio.sleep(max(0.0, t0 + when - time.perf_counter()))
        result = await send(session, url, request_body("chat", MODEL, prompt, True), "chat",
                            {"Authorization": "Bearer sk-chat"})
        return {"ttft": result.ttft, "status": result.status, "error": result.error,
                "class": result.headers.get("x-raystack-priority"), "start": t0 + when, "end": time.perf_counter()}

    return await asyncio.gather(*(at(when, prompt) for when, prompt in plan))


async def wait_for_classes(session: aiohttp.ClientSession, url: str, wanted: dict[str, str]) -> None:
    """Until the router has read the keys file again: each key's answers carry its class."""
    deadline = time.monotonic() + 60
    for key, priority in wanted.items():
        while True:
            result = await send(session, url, request_body("chat", MODEL, random_prompts(1, 4, 1)[0], False), "chat",
                                {"Authorization": f"Bearer sk-{key}"})
            if result.headers.get("x-raystack-priority") == priority:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the router did not take key {key}'s class {priority} within 60 s")
            await asyncio.sleep(1)


async def phase(url: str, name: str, keys: Path, plan: list, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    classes = CLASSES.get(name, CLASSES["fcfs"])
    keys.write_text(keys_file(classes))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600),
                                     connector=aiohttp.TCPConnector(limit=256)) as session:
        await wait_for_classes(session, url, {k: c or "standard" for k, c in classes.items()})
        batch = None
        if name != "idle":
            batch = Batch(session, url, args.batch_streams, args.batch_tokens, seed)
            await asyncio.sleep(args.settle_s)
        results = await chat(session, url, plan)
        if batch is not None:
            await batch.stop()
    done = [r for r in results if r["ttft"] is not None and r["error"] is None]
    ttfts = sorted(r["ttft"] for r in done)
    start, end = min(r["start"] for r in results), max(r["end"] for r in results)
    return {
        "chat_requests": len(results), "chat_errors": len(results) - len(done),
        "chat_429": sum(r["status"] == 429 for r in results),
        "chat_classes": sorted({r["class"] for r in results if r["class"]}),
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p90_s": percentile(ttfts, 90),
        "batch_tokens_per_s": batch.tokens_per_s(start, end) if batch else None,
        "batch_429": batch.refused if batch else None,
        "batch_errors": len(batch.errors) if batch else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-streams", type=int, default=8)
    parser.add_argument("--batch-tokens", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=4)
    parser.add_argument("--batch-share", type=float, default=0.5,
                        help="class batch's max_share (the router's default is 0.75): of 4 running sequences, "
                             "0.5 leaves two to chat requests, which overlap at 0.5/s")
    parser.add_argument("--rate", type=float, default=0.5, help="chat requests/s, Poisson arrivals")
    parser.add_argument("--requests", type=int, default=30, help="chat requests per phase")
    parser.add_argument("--chat-prompt-tokens", type=int, default=64, help="words, about as many tokens")
    parser.add_argument("--chat-tokens", type=int, default=16)
    parser.add_argument("--settle-s", type=float, default=15, help="batch work before the chat requests start")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench_results"))
    args = parser.parse_args()

    from raystack.app import delete_stack, run_stack
    from raystack.models.sources import resolve
    from raystack.process import LOCAL_RAY_ENV
    from tests.serve_cluster import free_port, serve_cluster

    resolve(SOURCE, progress=print)
    rng = random.Random(args.seed)
    at, plan = 0.0, []
    for prompt in random_prompts(args.requests, args.chat_prompt_tokens, args.chat_tokens, seed=args.seed + 1):
        at += rng.expovariate(args.rate)
        plan.append((at, prompt))

    # Stopped (Ctrl-C, or kill: SIGINT is ignored in a background job), it still shuts Ray and Serve down.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    os.environ.update(LOCAL_RAY_ENV)  # the Ray it starts runs as `raystack start` runs it
    runs: dict[str, list[dict]] = {"idle": [], "fcfs": [], "priority": []}
    with tempfile.TemporaryDirectory() as keys_dir, serve_cluster():
        keys = Path(keys_dir) / "api_keys"
        keys.write_text(keys_file(CLASSES["fcfs"]))
        port = free_port()
        try:
            run_stack(stack(keys, args.max_num_seqs, port, args.batch_share), name=APP, route_prefix=f"/{APP}")
            url = f"http://127.0.0.1:{port}/{APP}/v1/chat/completions"
            for round_ in range(args.rounds):
                order = ["idle", "fcfs", "priority"] if round_ % 2 == 0 else ["idle", "priority", "fcfs"]
                for name in order:
                    summary = asyncio.run(phase(url, name, keys, plan, args, seed=args.seed + 10 * round_))
                    runs[name].append(summary)
                    print(f"round {round_ + 1} {name}: " + ", ".join(
                        f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()), flush=True)
        finally:
            delete_stack(APP)

    def mean(name: str, key: str) -> float | None:
        values = [run[key] for run in runs[name] if run[key] is not None]
        return statistics.mean(values) if values else None

    lines = [f"{args.batch_streams} batch streams ({args.batch_tokens}-token answers to 200-word prompts) on one vLLM "
             f"CPU replica of SmolLM2-135M (float32) with max_num_seqs {args.max_num_seqs}, class batch's max_share "
             f"{args.batch_share}; chat requests at "
             f"{args.rate}/s (Poisson, seed {args.seed}), {args.requests} a phase, {args.chat_prompt_tokens}-word "
             f"prompts, {args.chat_tokens}-token answers; {args.rounds} rounds, means (per-round chat p90 in "
             f"brackets).",
             "", "| phase | chat TTFT p50 s | chat TTFT p90 s | chat errors / 429 | batch tok/s | batch 429 |",
             "|---|---|---|---|---|---|"]
    for name in runs:
        p90s = " / ".join(f"{run['ttft_p90_s']:.3f}" for run in runs[name])
        batch = mean(name, "batch_tokens_per_s")
        lines.append(f"| {name} | {mean(name, 'ttft_p50_s'):.3f} | {mean(name, 'ttft_p90_s'):.3f} ({p90s}) | "
                     f"{sum(r['chat_errors'] for r in runs[name])} / {sum(r['chat_429'] for r in runs[name])} | "
                     f"{'-' if batch is None else f'{batch:.1f}'} | "
                     f"{'-' if name == 'idle' else sum(r['batch_429'] for r in runs[name])} |")
    idle, fcfs, prio = (mean(name, "ttft_p90_s") for name in ("idle", "fcfs", "priority"))
    lines += ["", f"chat p90 with classes: {prio / idle:.2f}x idle (target <= 2), {prio / fcfs:.3f} of fcfs "
                  f"(target <= 0.333)"]
    table = "\n".join(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / datetime.now().strftime("priority-%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps({"args": vars(args), "runs": runs, "table": table}, indent=1))
    print("\n" + table + f"\n\nraw results: {path}")


if __name__ == "__main__":
    main()
