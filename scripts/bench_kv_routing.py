#!/usr/bin/env python
"""Routing policies on a shared-prefix workload: kv_aware against prefix_affinity and least_loaded, in one run.

The workload: `--tenants` tenants, each with a system prompt of `--prefix-tokens` tokens, asking short
questions (one each, a few tokens), at fixed-seed Poisson arrivals of `--rate` requests/s (open loop: a slow
answer does not slow the arrivals), the tenant of each request drawn at random. A warm-up of one request per
tenant, in random order, comes first at the same rate, and is answered in full before the measured requests
start; it is not measured: the measured requests are the steady state, where a miss is the routing's doing,
not a tenant's first visit, and none queues behind the warm-up's prefills. Two vLLM CPU replicas of the
embedded model serve it, each with a KV cache sized to hold `--cache-fraction` of all the tenants' prefixes
(default 2/3: more than one replica's cache holds, less than two), so where each tenant's requests go decides
how often its prefix is found cached. Every policy gets the same requests at the same times, on freshly
started replicas (empty caches), in `--rounds` rounds, the policies' order rotating each round. The router runs
`--router-replicas` replicas on one port (2, as the cluster configs run it), and each request comes on a new
connection, as from many clients: the kernel spreads them over the router replicas, and each replica routes
by what it knows (prefix_affinity: the prefixes it routed itself; kv_aware: the engines' events, the same for
every router replica).

Reported per policy (means over rounds, and each round's):
  hit rate     cached prompt tokens / prompt tokens, from each answer's usage (prompt_tokens_details.
               cached_tokens: the tokens vLLM's prefix cache served, the counts its own prefix_cache_hits /
               prefix_cache_queries sum)
  predicted    kv_aware only: the share of requests whose cached tokens the router expected exactly
               (x-raystack-cached-tokens-expected against the engine's usage)
  TTFT p50/p90 to the first content token, as the client sees it
  tokens/s     output tokens over the run's span

    .venv/bin/python scripts/bench_kv_routing.py --rounds 3

Results go to bench_results/kv-routing-<time>.json and a table on stdout.
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
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raystack.bench.datasets import Prompt  # noqa: E402
from raystack.bench.loadgen import request_body, send  # noqa: E402
from raystack.bench.report import percentile  # noqa: E402

MODEL = "smollm2"
SOURCE = "smollm2-135m-instruct"
APP = "kvbench"
POLICIES = ("kv_aware", "prefix_affinity", "least_loaded")
WORDS = ("cluster node card rank ring link queue token prompt cache block model layer weight shard memory "
         "driver kernel stream batch tenant answer question policy replica engine router budget limit").split()


def kv_bytes_per_token(model_dir: Path, dtype_bytes: int = 4) -> int:
    """A token's K and V over every layer, in float32 (the embedded model's dtype in local.yaml)."""
    config = json.loads((model_dir / "config.json").read_text())
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return 2 * config["num_hidden_layers"] * config.get("num_key_value_heads", heads) * head_dim * dtype_bytes


def tenant_prompts(tokenizer: Any, tenants: int, tokens: int, rng: random.Random) -> list[str]:
    """Each tenant's system prompt: its own words, `tokens` tokens long (as the tokenizer counts them)."""
    prompts = []
    for tenant in range(tenants):
        words = [f"Tenant {tenant} instructions:"]
        while len(tokenizer(" ".join(words))["input_ids"]) < tokens:
            words.append(rng.choice(WORDS))
        prompts.append(" ".join(words[:-1]))
    return prompts


Plan = list[tuple[float, int, str]]  # (send time in s from the phase's start, tenant, question)


def schedule(tenants: int, requests: int, rate: float, rng: random.Random) -> tuple[Plan, Plan]:
    """The warm-up (each tenant once) and the measured requests."""
    warmup = list(range(tenants))
    rng.shuffle(warmup)

    def paced(order: list[int], first: int) -> Plan:
        at, out = 0.0, []
        for n, tenant in enumerate(order, first):
            at += rng.expovariate(rate)
            out.append((at, tenant, f"Question {n}: what about the {rng.choice(WORDS)}?"))
        return out

    return paced(warmup, 0), paced([rng.randrange(tenants) for _ in range(requests)], tenants)


def stack(policy: str, cache_bytes: int, max_tokens: int) -> dict[str, Any]:
    backend = {
        "name": "vllm", "engine": "vllm", "device": "cpu", "max_model_len": 2048,
        "engine_args": {"dtype": "float32", "kv_cache_memory_bytes": cache_bytes},
        # Every policy's answers report their cached tokens (kv_aware turns this on by itself).
        "serving_args": {"enable_prompt_tokens_details": True},
        "resources": {"cpus": 0.5}, "autoscaling": {"min_replicas": 2, "max_replicas": 2},
        "max_ongoing_requests": 16,
    }
    return {"models": [{"name": MODEL, "source": SOURCE, "routing": {"policy": policy}, "backends": [backend]}]}


async def one(session: aiohttp.ClientSession, url: str, system: str, question: str,
              max_tokens: int) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    result = await send(session, url, request_body("chat", MODEL, Prompt(messages, max_tokens), False), "chat", {})
    if not result.ok:
        return {"error": result.error}
    expected = result.headers.get("x-raystack-cached-tokens-expected")
    return {"ttft": result.ttft, "prompt_tokens": result.input_tokens, "cached_tokens": result.cached_tokens or 0,
            "output_tokens": result.output_tokens, "expected": None if expected is None else int(expected),
            "end": time.perf_counter()}


async def drive(url: str, prompts: list[str], phases: tuple[Plan, Plan], max_tokens: int) -> list[dict]:
    """Each phase's requests at their times; the next phase once the last one's answers are in. The last's results."""
    fresh_connections = aiohttp.TCPConnector(limit=256, force_close=True)  # a connection a request: many clients
    async with aiohttp.ClientSession(connector=fresh_connections, timeout=aiohttp.ClientTimeout(total=600)) as session:
        for plan in phases:
            t0 = time.perf_counter()

            async def at(when: float, tenant: int, question: str) -> dict[str, Any]:
                await asyncio.sleep(max(0.0, t0 + when - time.perf_counter()))
                result = await one(session, url, prompts[tenant], question, max_tokens)
                return {**result, "start": t0 + when}

            results = await asyncio.gather(*(at(*item) for item in plan))
        return results


def summarise(results: list[dict]) -> dict[str, Any]:
    done = [r for r in results if "error" not in r]
    ttfts = sorted(r["ttft"] for r in done if r["ttft"] is not None)
    predicted = [r for r in done if r["expected"] is not None]
    span = max(r["end"] for r in done) - min(r["start"] for r in done)
    return {
        "requests": len(results), "errors": len(results) - len(done),
        "hit_rate": sum(r["cached_tokens"] for r in done) / max(1, sum(r["prompt_tokens"] for r in done)),
        "predicted_exactly": (sum(r["expected"] == r["cached_tokens"] for r in predicted) / len(predicted)
                              if predicted else None),
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p90_s": percentile(ttfts, 90),
        "output_tokens_per_s": sum(r["output_tokens"] for r in done) / span,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--tenants", type=int, default=30)
    parser.add_argument("--prefix-tokens", type=int, default=1024)
    parser.add_argument("--cache-fraction", type=float, default=2 / 3,
                        help="of all the tenants' prefixes, the share one replica's KV cache holds")
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--rate", type=float, default=0.5, help="requests/s, Poisson arrivals")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--router-replicas", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench_results"))
    args = parser.parse_args()

    from raystack.app import delete_stack, run_stack
    from raystack.models.sources import resolve
    from raystack.process import LOCAL_RAY_ENV
    from raystack.router.prompt_blocks import load_tokenizer
    from tests.serve_cluster import free_port, serve_cluster

    model_dir = resolve(SOURCE, progress=print)
    rng = random.Random(args.seed)
    prompts = tenant_prompts(load_tokenizer(model_dir), args.tenants, args.prefix_tokens, rng)
    phases = schedule(args.tenants, args.requests, args.rate, rng)
    cache_bytes = int(args.cache_fraction * args.tenants * (args.prefix_tokens + 128) * kv_bytes_per_token(model_dir))
    policies = args.policies.split(",")
    print(f"{args.tenants} tenants x {args.prefix_tokens} tokens, {args.requests} requests at {args.rate}/s, "
          f"KV cache {cache_bytes / 2**20:.0f} MiB a replica ({args.cache_fraction:.2f} of the prefixes)", flush=True)

    # Stopped (Ctrl-C, or kill: SIGINT is ignored in a background job), it still shuts Ray and Serve down.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    os.environ.update(LOCAL_RAY_ENV)  # the Ray it starts runs as `raystack start` runs it
    runs: dict[str, list[dict]] = {policy: [] for policy in policies}
    with serve_cluster():
        for round_ in range(args.rounds):
            order = policies[round_ % len(policies):] + policies[:round_ % len(policies)]
            for policy in order:
                port = free_port()
                router = {"port": port, "num_replicas": args.router_replicas}
                run_stack({**stack(policy, cache_bytes, args.max_tokens), "router": router}, name=APP,
                          route_prefix=f"/{APP}")
                time.sleep(5)  # the router's first look at its backends, and their replicas' metadata
                url = f"http://127.0.0.1:{port}/{APP}/v1/chat/completions"
                summary = summarise(asyncio.run(drive(url, prompts, phases, args.max_tokens)))
                runs[policy].append(summary)
                print(f"round {round_ + 1} {policy}: " + ", ".join(
                    f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()), flush=True)
                delete_stack(APP)

    def mean(policy: str, key: str) -> float | None:
        values = [run[key] for run in runs[policy] if run[key] is not None]
        return statistics.mean(values) if values else None

    lines = [f"{args.tenants} tenants x {args.prefix_tokens}-token system prompts, {args.requests} short questions "
             f"at {args.rate}/s (Poisson, seed {args.seed}) after a warm-up of one per tenant, {args.max_tokens} "
             f"tokens each; 2 vLLM CPU replicas "
             f"of SmolLM2-135M (float32), KV cache {cache_bytes / 2**20:.0f} MiB each; {args.router_replicas} router "
             f"replicas; {args.rounds} rounds, "
             f"means (per-round hit rates in brackets).", "",
             "| policy | hit rate | predicted exactly | TTFT p50 s | TTFT p90 s | output tok/s | errors |",
             "|---|---|---|---|---|---|---|"]
    for policy in policies:
        rounds = " / ".join(f"{run['hit_rate']:.2f}" for run in runs[policy])
        predicted = mean(policy, "predicted_exactly")
        lines.append(f"| {policy} | {mean(policy, 'hit_rate'):.3f} ({rounds}) | "
                     f"{'-' if predicted is None else f'{predicted:.3f}'} | {mean(policy, 'ttft_p50_s'):.3f} | "
                     f"{mean(policy, 'ttft_p90_s'):.3f} | {mean(policy, 'output_tokens_per_s'):.2f} | "
                     f"{sum(run['errors'] for run in runs[policy])} |")
    table = "\n".join(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / datetime.now().strftime("kv-routing-%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps({"args": vars(args), "runs": runs, "table": table}, indent=1))
    print("\n" + table + f"\n\nraw results: {path}")


if __name__ == "__main__":
    main()
