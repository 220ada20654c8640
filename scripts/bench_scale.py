#!/usr/bin/env python
"""What the router costs as its work grows (issue #28, point 5): short requests/s and latency p50/p99 with
1, 10 and 50 backends in its catalogue and with 10,000 API keys in its key file, against 1 backend, no key.

One session: one local Ray (2 CPUs) and Serve with raystack's Serve settings (process.py), each router on
its own port (one hop, router/listener.py; Serve's proxy runs beside it, idle, as in bench_router.py), the
synthetic engine answering as bench_router's "short" measurement has it (10 ms to the first token, 4 tokens,
whole answers), and bench_router's keep-alive load generator (`short`), at concurrency 1 and 32.

    1            router `scale`, one backend application: model `synthetic`, backend `hot`, 1 replica
    models-N     the same and N-1 more models, `cold-01`..., each with a backend application of its own
    backends-N   the same and N-1 more backends of `synthetic`, `cold-01`..., weight 0
    keys-1       router `scale-keys` (api_keys: {file: ...}) with its own `hot`; the file holds 1 key
    keys-10000   the same router once its key file is rewritten with 10,000 keys (it re-reads a changed file)

Why this is honest. 50 engine replicas do not fit on 2 cores and 24 GB, so the extra backends are real
backend applications with min_replicas 0: Serve runs their deployments, the router finds them in Serve's state
and lists them (GET /v1/models, checked before each measurement); only no replica runs until one is asked
for. What the router does with N backends: every 5 s it reads Serve's instance details of all applications
and, when they changed, parses each backend's registration into its catalogue (catalogue.py); it holds a
Serve handle per backend, started as the backend joins the catalogue (Forwarder.update's `.options()` starts
Serve's router for it, with its timers, whose request router tells /health the running replicas), used or
not; per request it finds the model in a dict, whatever N, then walks that model's own backends: its context bound
(admission.py), each backend's capability check (backends_unable), the policy's choice (Forwarder.choose, a
BackendLoad per backend). So `models-N` is a service of N models as it is, where each request's path stays
on its own model while the catalogue, Serve's state and its controller's work grow; `backends-N` puts all N
backends in the path of every request: under policy `weighted` the cold ones, weight 0, are walked and
weighed by every request and never chosen (weight 0: only when pinned as model@backend), so none scales
up. The hot model is `weighted` in every configuration (with one backend it acts as least_loaded), so its
application never changes; the cold applications are deployed and deleted by themselves between
configurations, never the router's or `hot`'s (a Python-API deploy gives each deployment a new version:
redeploying them would restart them). Not measured: load spread over 50 running backends (50 request
routers, 50 replicas), which needs the replicas.

Keys: requests carry one valid key, the file's last entry (no limits: no ledger call to admit it; its usage
is metered and settled in batches, as every key's). keys-1 against 1 is what keys cost at all, keys-10000
against keys-1 what their number costs. The longest request while the router re-reads its key file is
reported as the reload's stall (the router reads it on its event loop).

Each round runs every configuration, in reverse order every other round so the machine's drift hits all
alike, --duration s per concurrency, --settle s after a switch that changed something; ratios are against
`1`, per round and over the rounds. Where it goes: the CPU time of each process of the session (/proc) per
request answered, at the highest concurrency, by role: router, proxy, Serve's controller, engine, ledger,
client (this script), other (the rest of Ray, the idle router and its engine included).

    .venv/bin/python scripts/bench_scale.py --rounds 2 --duration 10
Results go to bench_results/scale-<time>.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench_router import MODEL, short, synthetic_backend  # this script's directory is on sys.path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROUTER, KEYS_ROUTER = "scale", "scale-keys"
ROUTE_PREFIX = {ROUTER: "/scale", KEYS_ROUTER: "/scale-keys"}
CONFIGS = ("1", "models-10", "models-50", "backends-10", "backends-50", "keys-1", "keys-10000")
BASELINE = "1"
MAX_KEYS = 10_000


def base_url(port: int, router: str) -> str:
    """Where `router`'s OpenAI API is: its replicas' own port (RouterConfig.port), under its route prefix."""
    return f"http://127.0.0.1:{port}{ROUTE_PREFIX[router]}/v1"


# ---- the configurations ---------------------------------------------------------------------------------

def hot_backend() -> dict[str, Any]:
    return {**synthetic_backend(10, 0, 1), "name": "hot"}  # bench_router's short-request engine


def cold_backend(name: str, weight: float) -> dict[str, Any]:
    return {**synthetic_backend(10, 0, 1), "name": name, "weight": weight,
            "autoscaling": {"min_replicas": 0, "max_replicas": 1}}


def service(config: str) -> dict[str, Any]:
    """Router `scale`'s whole service in `config` (a RaystackConfig's args); keys-* leave it at one backend."""
    kind, _, size = config.partition("-")
    n = int(size) if kind in ("models", "backends") else 1
    names = [f"cold-{i:02d}" for i in range(1, n)]
    hot = {"name": MODEL, "routing": {"policy": "weighted"}, "backends": [hot_backend()]}
    if kind == "backends":
        hot["backends"] += [cold_backend(name, 0) for name in names]
    others = [{"name": name, "backends": [cold_backend("synthetic", 1)]} for name in names] if kind == "models" else []
    return {"models": [hot, *others]}


def cold_apps(config: str) -> dict[str, Any]:
    """The backend applications (name -> BackendApp) of `config` beyond `hot`'s."""
    from raystack.config import backend_app_name, parse_config

    hot = backend_app_name(ROUTER, MODEL, "hot")
    return {name: app for name, app in parse_config(service(config)).backend_apps(ROUTER).items() if name != hot}


def listed(config: str) -> tuple[int, int]:
    """(models, backends of `synthetic`) GET /v1/models lists in `config`."""
    models = service(config)["models"]
    return len(models), len(models[0]["backends"])


def key_of(i: int) -> str:
    return f"sk-scale-{i:05d}-{hashlib.sha256(str(i).encode()).hexdigest()[:32]}"


USED_KEY = key_of(MAX_KEYS - 1)  # every request's: the last entry of either file
PROBE_KEY = key_of(0)  # only in the 10,000-key file: tells which file the router has read


def key_file(n: int) -> str:
    """A named-keys document of the last `n` of MAX_KEYS keys (so USED_KEY is always in it, and last)."""
    return "keys:\n" + "".join(f"  - name: key-{i:05d}\n    key: {key_of(i)}\n" for i in range(MAX_KEYS - n, MAX_KEYS))


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ---- switching between them -------------------------------------------------------------------------------

class Session:
    """The two routers, and what router `scale`'s catalogue and `scale-keys`' key file hold now."""

    def __init__(self, keys_path: Path, settle_s: float = 0):
        from tests.serve_cluster import free_port

        self.ports = {ROUTER: free_port(), KEYS_ROUTER: free_port()}
        self.keys_path = keys_path
        self.settle_s = settle_s
        self.cold: dict[str, Any] = {}  # cold applications deployed now
        self.keys = 1  # keys in the file now
        self.switches: list[dict[str, Any]] = []  # how long each switch took; the key reloads' stalls

    def deploy(self) -> None:
        from raystack.app import run_stack

        self.keys_path.write_text(key_file(1))
        run_stack({**service(BASELINE), "router": {"port": self.ports[ROUTER]}}, name=ROUTER,
                  route_prefix=ROUTE_PREFIX[ROUTER])
        run_stack({**service(BASELINE), "router": {"port": self.ports[KEYS_ROUTER],
                                                   "api_keys": {"file": str(self.keys_path)}}},
                  name=KEYS_ROUTER, route_prefix=ROUTE_PREFIX[KEYS_ROUTER])

    def url(self, config: str) -> str:
        router = KEYS_ROUTER if config.startswith("keys-") else ROUTER
        return base_url(self.ports[router], router)

    def headers(self, config: str) -> dict[str, str] | None:
        return auth(USED_KEY) if config.startswith("keys-") else None

    def switch_to(self, config: str) -> None:
        """Router `scale`'s catalogue as `config` has it (one backend for keys-*), and the key file too."""
        started = time.perf_counter()
        changed = self._catalogue(BASELINE if config.startswith("keys-") else config)
        stall = self._keys(int(config.split("-")[1])) if config.startswith("keys-") else None
        self.switches.append({"to": config, "took_s": time.perf_counter() - started, "key_reload_stall_s": stall})
        if changed or stall is not None:  # measured once Serve's controller is done with the change too
            time.sleep(self.settle_s)

    def _catalogue(self, config: str) -> bool:
        """Deploys and deletes cold applications as `config` has them; whether any were."""
        from ray import serve
        from ray.serve.context import _get_global_client

        from raystack.app import build_backend

        wanted = cold_apps(config)
        gone = [name for name in self.cold if name not in wanted]
        if gone:
            _get_global_client().delete_apps(gone, blocking=True)
        new = [serve.RunTarget(build_backend(app.model_dump(mode="json")), name=name, route_prefix=None)
               for name, app in wanted.items() if name not in self.cold]
        if new:
            serve.run_many(new, wait_for_ingress_deployment_creation=True, wait_for_applications_running=True)
        self.cold = wanted
        self._wait_listed(*listed(config))
        return bool(gone or new)

    def _wait_listed(self, models: int, backends: int, timeout_s: float = 60) -> None:
        """Until the router lists what it should (it looks at Serve's state every 5 s)."""
        deadline = time.monotonic() + timeout_s
        while True:
            data = httpx.get(f"{self.url(BASELINE)}/models", timeout=10).json()["data"]
            hot = next((m for m in data if m["id"] == MODEL), {})
            if len(data) == models and len(hot.get("backends", ())) == backends:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"router {ROUTER} lists {len(data)} models and {hot.get('backends')}, not "
                                   f"{models} models and {backends} backends of {MODEL}")
            time.sleep(0.5)

    def _keys(self, n: int, timeout_s: float = 120) -> float | None:
        """The key file rewritten with `n` keys; until the router has read it (PROBE_KEY is let in with the
        10,000 and not with 1). Returns the longest request meanwhile (s), None if it was already so."""
        if n == self.keys:
            return None
        written = self.keys_path.with_suffix(".new")
        written.write_text(key_file(n))
        os.replace(written, self.keys_path)
        self.keys = n
        expected = 200 if n > 1 else 401
        longest, deadline = 0.0, time.monotonic() + timeout_s
        with httpx.Client(timeout=60) as client:
            while True:
                started = time.perf_counter()
                status = client.get(f"{self.url('keys-1')}/models", headers=auth(PROBE_KEY)).status_code
                longest = max(longest, time.perf_counter() - started)
                if status == expected:
                    return longest
                if time.monotonic() > deadline:
                    raise RuntimeError(f"router {KEYS_ROUTER} did not read its {n} keys within {timeout_s:g} s")
                time.sleep(0.02)


# ---- where the CPU goes ------------------------------------------------------------------------------------

def cpu_seconds() -> dict[int, tuple[str, float]]:
    """pid -> (title, CPU seconds so far) of this process and all it started (Ray's processes of this
    session: its workers are titled after their actor, ray::ServeReplica:<app>:<deployment>)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stats[int(entry)] = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            children.setdefault(int(stats[int(entry)][1]), []).append(int(entry))
    found, todo, tick = {}, [os.getpid()], os.sysconf("SC_CLK_TCK")
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        title = argv[0].decode().removeprefix("ray::") if argv[0].startswith(b"ray::") else Path(
            next((a for a in argv if a.endswith(b".py")), argv[0]).decode()).name
        found[pid] = (title, (int(stats[pid][11]) + int(stats[pid][12])) / tick)
    return found


def roles(router: str) -> dict[str, str]:
    """Process title -> the role it plays for requests to `router` (Ray adds `.method` to an actor's title
    while it runs one: titles are matched by their start)."""
    return {"ServeController": "controller", "ProxyActor": "proxy", f"ServeReplica:{router}:Router": "router",
            f"ServeReplica:{router}.{MODEL}.hot:LLMServer-{MODEL}-hot": "engine", "QuotaLedger": "ledger",
            Path(__file__).name: "client"}


def cpu_per_request(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], router: str,
                    requests: float) -> dict[str, float]:
    """CPU ms per request of each role between two cpu_seconds(); `other`: the rest of Ray (GCS, raylet, agents,
    the idle router and its engine, cold replicas)."""
    named = roles(router)
    spent: dict[str, float] = {}
    for pid, (title, seconds) in after.items():
        role = next((role for start, role in named.items() if title.startswith(start)), "other")
        spent[role] = spent.get(role, 0.0) + seconds - (before[pid][1] if pid in before else 0.0)
    return {role: 1000 * seconds / requests for role, seconds in spent.items()}


def measure(session: Session, config: str, concurrencies: list[int], duration_s: float) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for concurrency in concurrencies:
        before, started = cpu_seconds(), time.perf_counter()
        figures = asyncio.run(short(f"{session.url(config)}/chat/completions", concurrency, duration_s,
                                    session.headers(config)))
        requests = figures["requests_per_s"] * (time.perf_counter() - started)
        row |= {f"c{concurrency}_{k}": v for k, v in figures.items()}
        router = KEYS_ROUTER if config.startswith("keys-") else ROUTER
        row[f"c{concurrency}_cpu_ms_per_request"] = cpu_per_request(before, cpu_seconds(), router, requests)
    return row


# ---- the session -------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=10, help="seconds of each measurement")
    parser.add_argument("--concurrency", default="1,32", help="concurrencies of the short requests")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"a subset of {', '.join(CONFIGS)}")
    parser.add_argument("--warmup", type=float, default=5, help="seconds of load on each router before round 1")
    parser.add_argument("--settle", type=float, default=5, help="seconds to wait after a switch of configuration")
    args = parser.parse_args()
    configs = [c for c in CONFIGS if c in args.configs.split(",")]
    if BASELINE not in configs:
        parser.error(f"--configs must include {BASELINE}, the baseline")
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    from raystack import process

    os.environ.update(process.RAY_START_ENV)  # as `raystack start` exports them
    from tests.serve_cluster import serve_cluster  # Serve reads its settings when imported: only now

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    results: dict[str, Any] = {"args": vars(args), "commit": commit.strip(), "rounds": []}
    # The replicas' logs (an access log line per request) stay in Ray's log files, not relayed to this process.
    with tempfile.TemporaryDirectory() as workdir, serve_cluster(log_to_driver=False):
        session = Session(Path(workdir) / "api_keys.yaml", args.settle)
        session.deploy()
        for config in (BASELINE, "keys-1"):  # the first requests after a deploy are slower: not in round 1
            measure(session, config, [max(concurrencies)], args.warmup)
        for r in range(args.rounds):
            row: dict[str, Any] = {}
            for config in configs if r % 2 == 0 else configs[::-1]:
                session.switch_to(config)
                row[config] = measure(session, config, concurrencies, args.duration)
                print(f"round {r + 1} {config}: " + json.dumps(
                    {k: round(v, 1) for k, v in row[config].items() if not isinstance(v, dict)}), flush=True)
            results["rounds"].append(row)
        results["switches"] = session.switches
    report(results, concurrencies)


def report(results: dict[str, Any], concurrencies: list[int]) -> None:
    rounds = results["rounds"]

    def mean(config: str, key: str) -> float:
        return statistics.mean(r[config][key] for r in rounds)

    configs = [c for c in CONFIGS if c in rounds[0]]
    head = " | ".join(f"c{c} req/s | c{c} p50 ms | c{c} p99 ms | c{c} vs {BASELINE}" for c in concurrencies)
    print(f"\nShort whole answers (10 ms engine, 4 tokens), means of {len(rounds)} rounds:\n")
    print(f"| configuration | {head} |")
    print("|---|" + "---|" * 4 * len(concurrencies))
    summary: dict[str, Any] = {}
    for config in configs:
        cells = []
        for c in concurrencies:
            rps = mean(config, f"c{c}_requests_per_s")
            ratio = rps / mean(BASELINE, f"c{c}_requests_per_s")
            per_round = [r[config][f"c{c}_requests_per_s"] / r[BASELINE][f"c{c}_requests_per_s"] for r in rounds]
            summary.setdefault(config, {})[f"c{c}"] = {
                "requests_per_s": rps, "ratio": ratio, "ratio_per_round": per_round,
                "p50_ms": mean(config, f"c{c}_p50_ms"), "p99_ms": mean(config, f"c{c}_p99_ms")}
            cells.append(f"{rps:.1f} | {mean(config, f'c{c}_p50_ms'):.1f} | {mean(config, f'c{c}_p99_ms'):.1f} | "
                         f"{ratio:.3f}")
        print(f"| {config} | {' | '.join(cells)} |")
    print(f"\nrequests/s vs {BASELINE}, per round:")
    for config in configs:
        if config != BASELINE:
            print(f"  {config}: " + "; ".join(
                f"c{c} " + ", ".join(f"{x:.3f}" for x in summary[config][f"c{c}"]["ratio_per_round"])
                for c in concurrencies))
    c = max(concurrencies)
    columns = ("router", "proxy", "controller", "engine", "ledger", "client", "other")
    print(f"\nCPU ms per request at concurrency {c}, by process (other: the rest of Ray, the idle router included):\n")
    print(f"| configuration | {' | '.join(columns)} | all |")
    print("|---|" + "---|" * (len(columns) + 1))
    for config in configs:
        cpu = {role: statistics.mean(r[config][f"c{c}_cpu_ms_per_request"].get(role, 0.0) for r in rounds)
               for role in {role for r in rounds for role in r[config][f"c{c}_cpu_ms_per_request"]}}
        summary[config][f"c{c}"]["cpu_ms_per_request"] = cpu
        print(f"| {config} | {' | '.join(f'{cpu.get(role, 0.0):.2f}' for role in columns)} | {sum(cpu.values()):.2f} |")
    stalls = [s["key_reload_stall_s"] for s in results["switches"] if s["key_reload_stall_s"] is not None]
    if stalls:
        print("\nlongest request while the router re-read its key file (s): "
              + ", ".join(f"{s['to']} {s['key_reload_stall_s']:.2f}" for s in results["switches"]
                          if s["key_reload_stall_s"] is not None))
    results["summary"] = summary
    out = ROOT / "bench_results" / f"scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
