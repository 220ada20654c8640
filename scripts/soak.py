"""Soak test: mixed load against an OpenAI-compatible endpoint for a set time, one engine replica killed
on the way; reports requests by outcome, the 5xx the kill does not explain (must be 0), p50/p99 latency and
the router's and replicas' memory at start and end.

Each request is drawn by weight, and has an expected result:
    chat_stream, chat, completion_stream, completion   200 (a stream ends in `data: [DONE]`, no error event)
    left         a chat stream the client leaves after 1-3 chunks
    malformed    invalid JSON, max_tokens "5", messages [], temperature 9                 a 4xx
    over_limit   max_tokens 10**9 (past any context: 400), a body over 8 MiB (413)       a 4xx
Outcomes: ok, expected_4xx, left, unexpected_4xx, unexpected_2xx (an invalid request accepted), 5xx,
stream_error_event (a `data: {"error": ...}` event), stream_cut (no [DONE]), timeout, connection_error.

Fault: after --kill-replica-after seconds one LLMServer replica is killed with ray.kill(no_restart=True), as a
crash would; then plain requests probe until three in a row succeed. A failure (5xx, stream error event,
stream cut, timeout, connection error) is put down to the kill when its request was in flight at the kill,
started before the service answered again, or was served by the killed replica (x-raystack-replica).
Any other failure is unexplained: exit status 1.

Memory: RSS of the Serve replica processes (/proc, so only when the endpoint runs on this machine): the
Router's, the LLMServer replicas', and their children's (vLLM's EngineCore, MindIE's daemon), at start and end.

    .venv/bin/python scripts/soak.py --base-url http://127.0.0.1:8000 --duration 600
Results go to bench_results/soak-<time>.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raystack.bench.report import percentile  # noqa: E402

# Share of each kind of request in the mix.
WEIGHTS = {"chat_stream": 30, "chat": 15, "completion_stream": 15, "completion": 10, "left": 10,
           "malformed": 12, "over_limit": 8}
MALFORMED = ["invalid_json", "max_tokens_string", "empty_messages", "temperature_9"]
OVER_LIMIT = {"max_tokens_huge": 3, "body_over_8mib": 1}  # the big body is rarer: 8 MiB a time
BIG_BODY_BYTES = (8 << 20) + (64 << 10)  # past raystack's default router.max_request_bytes (8 MiB)
EXPECTED = {"chat_stream": "ok", "chat": "ok", "completion_stream": "ok", "completion": "ok", "left": "left",
            "malformed": "client_error_expected", "over_limit": "client_error_expected"}
FAILURES = ("5xx", "stream_error_event", "stream_cut", "timeout", "connection_error")
OUTCOMES = ("ok", "expected_4xx", "left", "unexpected_4xx", "unexpected_2xx", *FAILURES)
WORDS = ("river stone lantern quiet orbit maple signal harbor copper meadow falcon ember willow tide cipher "
         "granite velvet summit echo prairie").split()
RECOVERED_AFTER = 3  # plain answers in a row that end the fault window


@dataclass
class Result:
    kind: str
    variant: str
    expected: str
    start: float  # seconds since the run began
    end: float = 0.0
    outcome: str = ""
    status: int | None = None
    latency: float | None = None  # to the end of the answer (or to leaving, for `left`)
    ttft: float | None = None  # streams: to the first data event
    replica: str | None = None  # x-raystack-replica, when the endpoint names it
    error: str | None = None
    cause: str | None = None  # for a failure: "fault" or "unexplained"


@dataclass
class Fault:
    planned_at: float | None
    victim: str | None = None
    killed_at: float | None = None
    recovered_at: float | None = None
    error: str | None = None
    probes: list[dict[str, Any]] = field(default_factory=list)


# ---- requests ---------------------------------------------------------------------------------------

def prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24)))


def build(kind: str, rng: random.Random, model: str, max_tokens: int) -> tuple[str, str, dict | bytes]:
    """(variant, path, JSON body or raw bytes) of one request of `kind`."""
    chat = {"model": model, "messages": [{"role": "user", "content": prompt(rng)}], "max_tokens": max_tokens}
    if kind in ("chat_stream", "chat", "left"):
        return kind, "/v1/chat/completions", {**chat, "stream": kind != "chat"}
    if kind in ("completion_stream", "completion"):
        return kind, "/v1/completions", {"model": model, "prompt": prompt(rng), "max_tokens": max_tokens,
                                         "stream": kind == "completion_stream"}
    if kind == "malformed":
        variant = rng.choice(MALFORMED)
        if variant == "invalid_json":
            return variant, "/v1/chat/completions", json.dumps(chat)[:-7].encode()  # cut mid-object
        changes = {"max_tokens_string": {"max_tokens": "5"}, "empty_messages": {"messages": []},
                   "temperature_9": {"temperature": 9}}[variant]
        return variant, "/v1/chat/completions", {**chat, **changes}
    variant = rng.choices(list(OVER_LIMIT), weights=list(OVER_LIMIT.values()))[0]
    if variant == "max_tokens_huge":
        return variant, "/v1/chat/completions", {**chat, "max_tokens": 10**9}
    return variant, "/v1/completions", big_body(model)


_BIG: dict[str, bytes] = {}


def big_body(model: str) -> bytes:
    # Built once: encoding 8 MiB of JSON per request would cost this client more than the server.
    if model not in _BIG:
        _BIG[model] = json.dumps({"model": model, "prompt": "x" * BIG_BODY_BYTES, "max_tokens": 1}).encode()
    return _BIG[model]


def outcome_of_status(status: int, expected: str) -> str:
    if status >= 500:
        return "5xx"
    if 400 <= status < 500:
        return "expected_4xx" if expected == "client_error_expected" else "unexpected_4xx"
    return "unexpected_2xx" if expected == "client_error_expected" else "ok"


def short(text: str | bytes, limit: int = 300) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return " ".join(text.split())[:limit]


async def read_stream(response: httpx.Response, result: Result, t0: float, leave_after: int | None) -> None:
    """Reads SSE events into `result`: ok on [DONE], stream_error_event on an error event, left after
    `leave_after` events (the caller's `async with` then closes the connection mid-answer)."""
    events = 0
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if result.ttft is None:
            result.ttft = time.monotonic() - t0 - result.start
        if data == "[DONE]":
            result.outcome = result.outcome or "ok"
            return
        try:
            event = json.loads(data)
        except ValueError:
            result.outcome, result.error = "stream_error_event", f"not JSON: {short(data)}"
            continue
        if isinstance(event, dict) and "error" in event and not result.outcome:
            result.outcome, result.error = "stream_error_event", short(json.dumps(event["error"]))
        events += 1
        if leave_after is not None and events >= leave_after and not result.outcome:
            result.outcome = "left"
            return
    result.outcome = result.outcome or "stream_cut"


async def one_request(client: httpx.AsyncClient, kind: str, rng: random.Random, args: argparse.Namespace,
                      t0: float, timeout_s: float, max_tokens: int | None = None) -> Result:
    variant, path, body = build(kind, rng, args.model, max_tokens or args.max_tokens)
    result = Result(kind, variant, EXPECTED[kind], start=time.monotonic() - t0)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    streaming = isinstance(body, dict) and body.get("stream") is True
    leave_after = rng.randint(1, 3) if kind == "left" else None
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", path, content=content,
                                     headers={"Content-Type": "application/json"}) as response:
                result.status = response.status_code
                result.replica = response.headers.get("x-raystack-replica")
                if response.status_code == 200 and streaming:
                    await read_stream(response, result, t0, leave_after)
                else:
                    raw = await response.aread()
                    result.outcome = outcome_of_status(response.status_code, result.expected)
                    if response.status_code != 200:
                        result.error = short(raw)
    except TimeoutError:
        result.outcome, result.error = "timeout", f"no complete answer within {timeout_s:g} s"
    except httpx.TimeoutException as err:
        result.outcome, result.error = "timeout", f"{type(err).__name__}: {short(str(err))}"
    except httpx.TransportError as err:
        result.outcome, result.error = "connection_error", f"{type(err).__name__}: {short(str(err))}"
    result.end = time.monotonic() - t0
    result.latency = result.end - result.start
    return result


async def worker(client: httpx.AsyncClient, rng: random.Random, args: argparse.Namespace, t0: float,
                 results: list[Result]) -> None:
    kinds, weights = list(WEIGHTS), list(WEIGHTS.values())
    while time.monotonic() - t0 < args.duration:
        results.append(await one_request(client, rng.choices(kinds, weights)[0], rng, args, t0,
                                          args.request_timeout))


# ---- the fault --------------------------------------------------------------------------------------

def engine_replicas() -> list[tuple[str, str]]:
    """(actor name, namespace) of every LLMServer replica: SERVE_REPLICA::<app>#<deployment>#<id>."""
    import ray

    found = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        parts = actor["name"].removeprefix("SERVE_REPLICA::").split("#")
        if actor["name"].startswith("SERVE_REPLICA::") and len(parts) == 3 and parts[1].startswith("LLMServer-"):
            found.append((actor["name"], actor["namespace"]))
    return sorted(found)


def kill_one(rng: random.Random, seen: set[str], t0: float) -> tuple[str, float]:
    """Kills one engine replica, among those seen answering when the endpoint names them (so a second
    cluster on the machine is never touched); returns its actor name and when the kill was sent."""
    import ray

    replicas = engine_replicas()
    if seen:
        replicas = [r for r in replicas if r[0].rsplit("#", 1)[1] in seen]
    if not replicas:
        raise LookupError("no LLMServer replica of this endpoint in the Ray cluster" + (
            f" (replicas seen answering: {', '.join(sorted(seen))})" if seen else ""))
    name, namespace = rng.choice(replicas)
    actor = ray.get_actor(name, namespace=namespace)  # the first call takes a second or two
    sent = time.monotonic() - t0
    ray.kill(actor, no_restart=True)
    return name, sent


async def inject_fault(client: httpx.AsyncClient, rng: random.Random, args: argparse.Namespace, t0: float,
                       fault: Fault, results: list[Result]) -> None:
    await asyncio.sleep(max(0.0, fault.planned_at - (time.monotonic() - t0)))
    seen = {r.replica for r in results if r.replica}
    try:
        fault.victim, fault.killed_at = await asyncio.to_thread(kill_one, rng, seen, t0)
    except Exception as err:  # the run goes on: the report says the fault was not injected
        fault.error = f"{type(err).__name__}: {short(str(err))}"
        print(f"replica kill failed: {fault.error}", file=sys.stderr)
        return
    print(f"[{fault.killed_at:6.1f} s] killed {fault.victim}", file=sys.stderr)
    # The window closes once plain requests are answered again, several in a row.
    in_a_row, give_up = 0, fault.killed_at + max(120.0, args.request_timeout)
    while time.monotonic() - t0 < give_up:
        probe = await one_request(client, "chat", rng, args, t0, timeout_s=30, max_tokens=4)  # short: a fine clock
        fault.probes.append({"start": probe.start, "end": probe.end, "outcome": probe.outcome,
                             "status": probe.status, "replica": probe.replica, "error": probe.error})
        in_a_row = in_a_row + 1 if probe.outcome == "ok" else 0
        if in_a_row >= RECOVERED_AFTER:
            fault.recovered_at = probe.end
            print(f"[{probe.end:6.1f} s] answering again", file=sys.stderr)
            return
        await asyncio.sleep(0.2)
    print("the endpoint did not answer again within the probe limit", file=sys.stderr)


def attribute(results: list[Result], fault: Fault) -> None:
    """Sets each failure's cause: the kill (in flight at it, started in the window, served by the victim)
    or unexplained."""
    victim_id = fault.victim.rsplit("#", 1)[1] if fault.victim else None
    window_end = fault.recovered_at if fault.recovered_at is not None else (
        max((p["end"] for p in fault.probes), default=fault.killed_at))
    for r in results:
        if r.outcome not in FAILURES:
            continue
        by_fault = fault.killed_at is not None and (
            r.start <= fault.killed_at <= r.end
            or fault.killed_at <= r.start <= window_end
            or (victim_id is not None and r.replica == victim_id))
        r.cause = "fault" if by_fault else "unexplained"


# ---- memory -----------------------------------------------------------------------------------------

def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return None


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process this user can read."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat, cmdline = _read(f"/proc/{entry}/stat"), _read(f"/proc/{entry}/cmdline")
        if stat is None or cmdline is None:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces
        table[int(entry)] = (ppid, cmdline.replace("\0", " ").strip())
    return table


def rss_kib(pid: int) -> int:
    for line in (_read(f"/proc/{pid}/status") or "").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0  # gone, or a kernel thread


def is_local(host: str) -> bool:
    """The endpoint's host is this machine: loopback, or an address a socket here can bind."""
    try:
        address = socket.getaddrinfo(host, None)[0][4][0]
        if ipaddress.ip_address(address).is_loopback or address in ("0.0.0.0", "::"):
            return True
        with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
            s.bind((address, 0))
        return True
    except OSError:
        return False


def listeners(port: int) -> set[int]:
    """Pids holding a listening TCP socket on `port`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in (_read(table) or "").splitlines()[1:]:
            cols = line.split()
            if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "0A":  # 0A: LISTEN
                inodes.add(cols[9])
    pids = set()
    for entry in (e for e in os.listdir("/proc") if e.isdigit()) if inodes else ():
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                link = os.readlink(f"/proc/{entry}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    pids.add(int(entry))
        except OSError:
            continue
    return pids


def local_raylet(base_url: str) -> tuple[int, str] | None:
    """(pid, GCS address) of the raylet whose Serve proxy listens on the endpoint's port, when that runs
    on this machine: several Ray clusters may run here (tests start their own), and only that one is
    measured and has a replica killed."""
    url = urlsplit(base_url)
    if not is_local(url.hostname or ""):
        return None
    table = process_table()
    for pid in listeners(url.port or (443 if url.scheme == "https" else 80)):
        while pid in table and pid > 1:
            ppid, cmdline = table[pid]
            if cmdline.split(" ", 1)[0].endswith("/raylet"):
                flag = next((a for a in cmdline.split() if a.startswith("--gcs-address=")), None)
                return pid, flag.split("=", 1)[1] if flag else ""
            pid = ppid
    return None


def memory(base_url: str, raylet: int | None) -> dict[str, Any] | None:
    """RSS (MiB) and process counts of the Router replicas, the LLMServer replicas and the LLMServer
    replicas' descendants; None when the endpoint is not on this machine."""
    if not is_local(urlsplit(base_url).hostname or ""):
        return None
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)

    def under(root: int) -> list[int]:
        found, stack = [], list(children.get(root, []))
        while stack:
            pid = stack.pop()
            found.append(pid)
            stack.extend(children.get(pid, []))
        return found

    scope = set(under(raylet)) if raylet else set(table)
    replicas = [pid for pid in scope if table[pid][1].startswith("ray::ServeReplica:")]
    groups = {"router": [p for p in replicas if ":Router" in table[p][1]],
              "llm_server": [p for p in replicas if ":LLMServer-" in table[p][1]]}
    groups["llm_server_children"] = [c for p in groups["llm_server"] for c in under(p)]
    out: dict[str, Any] = {"scoped_to_raylet": raylet}
    for name, pids in groups.items():
        out[name] = {"rss_mib": sum(rss_kib(p) for p in pids) / 1024, "processes": len(pids)}
    return out


async def watch_loop(lag: dict[str, float]) -> None:
    """This client's own stalls: a late event loop would show as server latency."""
    while True:
        t = time.monotonic()
        await asyncio.sleep(0.05)
        lag["max_s"] = max(lag["max_s"], time.monotonic() - t - 0.05)


async def sample_memory(args: argparse.Namespace, raylet: int | None, t0: float,
                        samples: list[dict[str, Any]]) -> None:
    """A reading every so often, for the JSON: a slow leak shows as a slope."""
    every = max(10.0, args.duration / 30)
    while True:
        await asyncio.sleep(every)
        reading = await asyncio.to_thread(memory, args.base_url, raylet)
        if reading is None:
            return
        samples.append({"t": time.monotonic() - t0, **{k: v["rss_mib"] for k, v in reading.items()
                                                        if isinstance(v, dict)}})


# ---- the run ----------------------------------------------------------------------------------------

def connect_ray(address: str, raylet: tuple[int, str] | None) -> str:
    """Joins the Ray cluster (the one serving the endpoint when "auto" and it runs here); its GCS address."""
    # Ray 2.60 turns token authentication on for a local cluster (serve run's) and keeps the token in
    # ~/.ray/auth_token; a driver given an address sends it only in token mode.
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN")
                                              or (Path.home() / ".ray" / "auth_token").exists()):
        os.environ["RAY_AUTH_MODE"] = "token"
    import ray

    if address == "auto" and raylet and raylet[1]:
        address = raylet[1]
    ray.init(address=address, namespace="serve", logging_level="ERROR", log_to_driver=False)
    # The first get_actor takes seconds: paid here, so the kill lands when planned.
    for name, namespace in engine_replicas()[:1]:
        ray.get_actor(name, namespace=namespace)
    return ray.get_runtime_context().gcs_address


async def first_model(client: httpx.AsyncClient) -> str:
    response = await client.get("/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def run(args: argparse.Namespace, raylet: tuple[int, str] | None) -> dict[str, Any]:
    rng = random.Random(args.seed)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 2, max_keepalive_connections=args.concurrency + 2)
    timeout = httpx.Timeout(args.request_timeout, connect=10)
    async with httpx.AsyncClient(base_url=args.base_url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=timeout) as client:
        args.model = args.model or await first_model(client)
        big_body(args.model)
        raylet_pid = raylet[0] if raylet else None
        memory_start = memory(args.base_url, raylet_pid)
        results: list[Result] = []
        samples: list[dict[str, Any]] = []
        fault = Fault(planned_at=args.kill_replica_after or None)
        if fault.planned_at and not args.ray_gcs_address:
            fault.error = f"Ray not reachable at {args.ray_address!r}"
        t0 = time.monotonic()
        started = time.time()
        tasks = [asyncio.create_task(worker(client, random.Random(rng.random()), args, t0, results))
                 for _ in range(args.concurrency)]
        lag = {"max_s": 0.0}
        side = [asyncio.create_task(sample_memory(args, raylet_pid, t0, samples))]
        watcher = asyncio.create_task(watch_loop(lag))
        if fault.planned_at and args.ray_gcs_address:
            side.append(asyncio.create_task(inject_fault(client, random.Random(rng.random()), args, t0, fault,
                                                         results)))
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - t0
        if len(side) > 1:
            if fault.killed_at is None:
                side[1].cancel()  # planned past the end of the load
                fault.error = fault.error or "planned after the load ended"
            await asyncio.gather(side[1], return_exceptions=True)  # the probes still close the window
        side[0].cancel()
        watcher.cancel()
        memory_end = memory(args.base_url, raylet_pid)
    attribute(results, fault)
    return {"started": started, "elapsed_s": elapsed, "results": results, "fault": fault,
            "memory_start": memory_start, "memory_end": memory_end, "memory_samples": samples,
            "client_loop_lag_max_s": lag["max_s"]}


def hit_by_fault(results: list[Result], fault: Fault) -> dict[str, Any]:
    """What the kill met: the requests in flight at it, those on the killed replica, and their outcomes."""
    if fault.killed_at is None:
        return {}
    victim_id = fault.victim.rsplit("#", 1)[1]
    in_flight = [r for r in results if r.start <= fault.killed_at <= r.end]
    on_victim = [r for r in in_flight if r.replica == victim_id]
    count = lambda rs: {o: n for o in OUTCOMES if (n := sum(r.outcome == o for r in rs))}  # noqa: E731
    return {"in_flight_at_kill": len(in_flight), "in_flight_outcomes": count(in_flight),
            "on_victim_at_kill": len(on_victim), "on_victim_outcomes": count(on_victim)}


# ---- the report -------------------------------------------------------------------------------------

def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def summarize(args: argparse.Namespace, raw: dict[str, Any]) -> dict[str, Any]:
    results: list[Result] = raw["results"]
    fault: Fault = raw["fault"]
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in [*WEIGHTS, "all"]:
        mine = [r for r in results if kind in ("all", r.kind)]
        matched = [r for r in mine if r.outcome in ("ok", "expected_4xx", "left")]  # as expected
        by_kind[kind] = {
            "requests": len(mine),
            "outcomes": {o: sum(r.outcome == o for r in mine) for o in OUTCOMES},
            "latency_p50_s": percentile([r.latency for r in matched], 50),
            "latency_p99_s": percentile([r.latency for r in matched], 99),
            "ttft_p50_s": percentile([r.ttft for r in matched if r.ttft is not None], 50),
            "ttft_p99_s": percentile([r.ttft for r in matched if r.ttft is not None], 99),
        }
    unexplained = [r for r in results if r.cause == "unexplained"]
    unexplained_5xx = [r for r in unexplained if r.outcome in ("5xx", "stream_error_event")]
    unexplained_timeouts = [r for r in unexplained if r.outcome == "timeout"]
    ok = [r for r in results if r.outcome == "ok"]
    return {
        "settings": {k: v for k, v in vars(args).items() if k != "api_key"} | {"api_key_set": bool(args.api_key)},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(raw["started"])),
        "elapsed_s": raw["elapsed_s"],
        "requests": len(results),
        "requests_per_s": len(results) / raw["elapsed_s"],
        "ok_latency_p99_s": percentile([r.latency for r in ok], 99),
        "by_kind": by_kind,
        "failures_by_fault": sum(r.cause == "fault" for r in results),
        "unexplained_5xx": len(unexplained_5xx),
        "unexplained_timeouts": len(unexplained_timeouts),
        "unexplained_other": len(unexplained) - len(unexplained_5xx) - len(unexplained_timeouts),
        "fault": asdict(fault) | hit_by_fault(results, fault),
        "client_loop_lag_max_s": raw["client_loop_lag_max_s"],
        "memory_start": raw["memory_start"],
        "memory_end": raw["memory_end"],
        "memory_samples": raw["memory_samples"],
        "unexplained": [asdict(r) for r in unexplained],
        "results": [asdict(r) for r in results],
    }


def print_report(s: dict[str, Any]) -> None:
    shown = [o for o in OUTCOMES if s["by_kind"]["all"]["outcomes"][o]] or ["ok"]
    heads = {"expected_4xx": "exp_4xx", "unexpected_4xx": "unexp_4xx", "unexpected_2xx": "unexp_2xx",
             "stream_error_event": "stream_err", "connection_error": "conn_err"}
    print(f"\nsoak: {s['settings']['base_url']} model {s['settings']['model']}, {s['elapsed_s']:.0f} s, "
          f"{s['requests']} requests, {s['requests_per_s']:.1f} req/s, concurrency {s['settings']['concurrency']}\n")
    print(f"{'kind':<18}{'n':>6}" + "".join(f"{heads.get(o, o):>11}" for o in shown)
          + f"{'lat p50':>9}{'lat p99':>9}{'ttft p50':>9}{'ttft p99':>9}  (ms)")
    for kind, row in s["by_kind"].items():
        print(f"{kind:<18}{row['requests']:>6}" + "".join(f"{row['outcomes'][o]:>11}" for o in shown)
              + f"{ms(row['latency_p50_s']):>9}{ms(row['latency_p99_s']):>9}"
              + f"{ms(row['ttft_p50_s']):>9}{ms(row['ttft_p99_s']):>9}")
    fault = s["fault"]
    print()
    if fault["planned_at"] is None:
        print("fault: none (--kill-replica-after 0)")
    elif fault["killed_at"] is None:
        print(f"fault: NOT injected ({fault['error']})")
    else:
        recovered = (f"answering again at {fault['recovered_at']:.1f} s "
                     f"({fault['recovered_at'] - fault['killed_at']:.1f} s after)"
                     if fault["recovered_at"] is not None else "NOT answering again")
        print(f"fault: killed {fault['victim']} at {fault['killed_at']:.1f} s; {recovered}; "
              f"{s['failures_by_fault']} failures put down to it")
        print(f"  in flight at the kill: {fault['in_flight_at_kill']} {fault['in_flight_outcomes']}, "
              f"of which on the killed replica (headers seen): {fault['on_victim_at_kill']} "
              f"{fault['on_victim_outcomes']}")
    print(f"unexplained 5xx: {s['unexplained_5xx']}   unexplained timeouts: {s['unexplained_timeouts']}   "
          f"other unexplained failures: {s['unexplained_other']}   ok p99 latency: {ms(s['ok_latency_p99_s'])} ms")
    print(f"this client's longest event-loop stall: {ms(s['client_loop_lag_max_s'])} ms")
    for r in s["unexplained"][:10]:
        print(f"  {r['start']:7.2f}-{r['end']:.2f} s {r['kind']}/{r['variant']} {r['outcome']} "
              f"status {r['status']} replica {r['replica']}: {r['error']}")
    start, end = s["memory_start"], s["memory_end"]
    if start is None or end is None:
        print("memory: n/a (the endpoint is not on this machine)")
        return
    print(f"\n{'memory (RSS MiB)':<22}{'start':>9}{'end':>9}{'delta':>9}  processes start/end")
    for group in ("router", "llm_server", "llm_server_children"):
        a, b = start[group], end[group]
        print(f"{group:<22}{a['rss_mib']:>9.1f}{b['rss_mib']:>9.1f}{b['rss_mib'] - a['rss_mib']:>+9.1f}  "
              f"{a['processes']}/{b['processes']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", required=True, help="the server root, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", help="default: the first id from GET /v1/models")
    parser.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    parser.add_argument("--concurrency", type=int, default=6, help="requests at once (default 6)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="sent as Authorization: Bearer (default $OPENAI_API_KEY)")
    parser.add_argument("--max-tokens", type=int, default=32, help="per answer (default 32)")
    parser.add_argument("--kill-replica-after", type=float,
                        help="seconds into the run to kill an LLMServer replica (default: half the duration; 0: never)")
    parser.add_argument("--ray-address", default="auto",
                        help='Ray cluster for the kill (default "auto": the one serving --base-url when it runs here)')
    parser.add_argument("--request-timeout", type=float, default=120, help="longest a request may take (s)")
    parser.add_argument("--out", type=Path, help="JSON results (default bench_results/soak-<time>.json)")
    parser.add_argument("--seed", type=int, help="for the request mix (default: random, recorded)")
    args = parser.parse_args()
    if args.kill_replica_after is None:
        args.kill_replica_after = args.duration / 2
    if args.seed is None:
        args.seed = random.randrange(2**31)
    args.out = args.out or ROOT / "bench_results" / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"

    raylet = local_raylet(args.base_url)
    args.ray_gcs_address = None
    if args.kill_replica_after:
        try:
            args.ray_gcs_address = connect_ray(args.ray_address, raylet)
        except Exception as err:  # the load still runs; the report says no fault was injected
            print(f"Ray not reachable at {args.ray_address!r}: {err}", file=sys.stderr)
    if raylet and args.ray_gcs_address and raylet[1] and args.ray_gcs_address != raylet[1]:
        print(f"warning: the endpoint is served by the cluster at {raylet[1]}, Ray joined {args.ray_gcs_address}",
              file=sys.stderr)

    raw = asyncio.run(run(args, raylet))
    summary = summarize(args, raw)
    summary["settings"]["out"] = str(args.out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1, default=str))
    print_report(summary)
    print(f"\n{args.out}")
    return 1 if summary["unexplained_5xx"] or summary["unexplained_timeouts"] or summary["unexplained_other"] else 0


if __name__ == "__main__":
    sys.exit(main())
