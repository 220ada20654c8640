#!/usr/bin/env python
"""What a key's limits cost per request: one router replica in front of a synthetic backend (0 ms TTFT), two
keys, one without limits and one with limits it never reaches (so every request asks the shared ledger,
router/quotas.py, and gives its slot back). Both keys' usage is booked (usage.py): the difference is what
the limits add. Alternating rounds of sequential requests, one key at a time;
the table gives each key's latency and the difference per round.

    .venv/bin/python scripts/bench_key_limits.py --rounds 3 --requests 300
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
KEYS = {"open": "sk-bench-open", "limited": "sk-bench-limited"}
KEY_FILE = f"""keys:
  - name: open
    key: {KEYS['open']}
  - name: limited
    key: {KEYS['limited']}
    requests_per_minute: 1000000000
    concurrent_requests: 1000000
    tokens_per_minute: 1000000000000
    tokens_per_day: 1000000000000000
"""


async def latencies(url: str, key: str, requests: int) -> list[float]:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        for _ in range(10):  # warm the path
            (await client.post(url, json=body)).raise_for_status()
        took = []
        for _ in range(requests):
            started = time.perf_counter()
            (await client.post(url, json=body)).raise_for_status()
            took.append(time.perf_counter() - started)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()

    import ray
    from ray import serve

    from raystack.app import run_stack
    from tests.serve_cluster import free_port

    port = free_port()
    keys = Path(tempfile.mkdtemp()) / "keys.yaml"
    keys.write_text(KEY_FILE)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    backend = {"name": "s", "engine": "synthetic", "synthetic": {"ttft_ms": 0, "tokens_per_s": 0},
               "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
    run_stack({"models": [{"name": "m", "backends": [backend]}], "router": {"api_keys": {"file": str(keys)}}},
              name="bench", route_prefix="/bench")
    url = f"http://127.0.0.1:{port}/bench/v1/chat/completions"
    medians: dict[str, list[float]] = {"open": [], "limited": []}
    p99s: dict[str, list[float]] = {"open": [], "limited": []}
    try:
        for round_ in range(args.rounds):
            order = ["open", "limited"] if round_ % 2 == 0 else ["limited", "open"]
            for name in order:
                took = sorted(asyncio.run(latencies(url, KEYS[name], args.requests)))
                medians[name].append(statistics.median(took) * 1000)
                p99s[name].append(took[int(len(took) * 0.99) - 1] * 1000)
            print(f"round {round_ + 1}: " + ", ".join(f"{n} p50 {medians[n][-1]:.2f} ms" for n in medians), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    print("\n| key | latency p50 ms | p99 ms |\n|---|---|---|")
    for name in medians:
        print(f"| {name} | {statistics.mean(medians[name]):.2f} | {statistics.mean(p99s[name]):.2f} |")
    added = [limited - open_ for limited, open_ in zip(medians["limited"], medians["open"])]
    print(f"\nadded p50 per round (limited - open): {', '.join(f'{a:+.2f} ms' for a in added)}")


if __name__ == "__main__":
    main()
