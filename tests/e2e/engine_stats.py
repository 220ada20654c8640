"""Watches an LLMServer deployment's engine load (LLMServer.stats) for a test, as a subprocess: the test
process never joins the stack's cluster as a Ray driver (it could not start clusters of its own later).

    python -m tests.e2e.engine_stats --address IP:PORT --app raystack.smollm2.vllm --deployment D

Prints `ready` once connected; then for each line `RUNNING TIMEOUT_S` read from stdin, waits until the
engine runs RUNNING requests (or the timeout passes) and prints the last stats as one JSON line."""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--app", required=True)
    parser.add_argument("--deployment", required=True)
    args = parser.parse_args()

    import ray
    from ray import serve

    ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
    engine = serve.get_deployment_handle(args.deployment, app_name=args.app)
    engine.stats.remote().result(timeout_s=60)  # the handle is set up before the test relies on it
    print("ready", flush=True)
    for line in sys.stdin:
        running, timeout_s = line.split()
        deadline = time.monotonic() + float(timeout_s)
        while True:
            stats = engine.stats.remote().result(timeout_s=30)
            if stats["running"] == int(running) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
