"""The one way tests start Ray Serve: a fresh Ray cluster of their own (never one a developer or
RAY_ADDRESS points at), Serve's HTTP on a free loopback port, and everything shut down afterwards. Also
how tests and benchmarks run a server as a process (`serve run`, vLLM's own server): started in its own
session, waited for until healthy, stopped with SIGINT as a user would, killed if it hangs; `local_stack`
is `serve run deploy_configs/local.yaml`, the embedded stack the e2e tests drive.

Without `nodes`, a local single-node Ray; with `nodes` (a list, maybe empty), a cluster simulated on this
machine (ray.cluster_utils.Cluster): a head, then one node per entry of `nodes` (Cluster.add_node's
arguments), and more may join it at `cluster.address`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import yaml

import ray
from ray import serve
from ray.cluster_utils import Cluster
from ray.serve._private import client as serve_client

from raystack.process import RAY_START_ENV

# Serve's client in this process asks the controller once a second whether applications run or are gone
# (serve.run, delete_apps), so every deploy and delete waited ~0.5 s more than it took, some 200 times a
# session. Asking every 0.1 s changes when this process notices, nothing that Serve does.
serve_client.CLIENT_POLLING_INTERVAL_S = 0.1

ROOT = Path(__file__).resolve().parents[1]
# The embedded stack's first start prepares the model and loads vLLM: minutes on 2 cores.
STARTUP_TIMEOUT_S = 900


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServeCluster:
    url: str  # Serve's HTTP base URL
    cluster: Cluster | None  # the simulated nodes, when there are any


@contextlib.contextmanager
def serve_cluster(nodes: list[dict[str, Any]] | None = None, head: dict[str, Any] | None = None,
                  http: dict[str, Any] | None = None, **ray_args: Any) -> Iterator[ServeCluster]:
    """`head`: the head node's arguments with `nodes` (default: 1 CPU, no dashboard); without `nodes`,
    ray.init's `ray_args` (default: 2 CPUs, no dashboard). `http`: more of Serve's HTTP options."""
    release_kept_serve_cluster()  # one Ray per process
    cluster = None
    if nodes is not None:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                                **(head or {})})
        for node in nodes:
            cluster.add_node(**node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="ERROR")
    else:
        ray.init(**{"address": "local", "num_cpus": 2, "include_dashboard": False, "logging_level": "ERROR",
                    **ray_args})
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port, **(http or {})})
        yield ServeCluster(f"http://127.0.0.1:{port}", cluster)
    finally:
        serve.shutdown()
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()


_kept: tuple[contextlib.ExitStack, ServeCluster] | None = None


def kept_serve_cluster() -> ServeCluster:
    """serve_cluster() with its defaults, kept running for the next test module that asks for it: starting
    and stopping Ray and Serve cost a module 7-10 s on 2 cores. The next module gets it with no
    application left (clear_applications). Stopped by release_kept_serve_cluster, which any other
    serve_cluster calls first."""
    global _kept
    if _kept is None:
        stack = contextlib.ExitStack()
        _kept = stack, stack.enter_context(serve_cluster())
    return _kept[1]


def release_kept_serve_cluster() -> None:
    global _kept
    if _kept is not None:
        stack, _kept = _kept[0], None
        stack.close()


def clear_applications() -> None:
    """Delete every Serve application, waiting for their replicas to stop."""
    from ray.serve.context import _get_global_client

    _get_global_client().delete_apps(list(serve.status().applications), blocking=True)


def serve_deploy(config: dict[str, Any], timeout_s: float = 120) -> None:
    """Deploy a Serve config file's applications (a mapping as the file holds it, without http_options) as
    `serve deploy` does: the dashboard's REST API hands it to the controller's apply_config, which versions
    each application by its args. Returns once every application runs."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
    names = {app["name"] for app in config["applications"]}
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = {name: app.status for name, app in serve.status().applications.items() if name in names}
        if len(statuses) == len(names) and all(s == "RUNNING" for s in statuses.values()):
            return
        if any(s == "DEPLOY_FAILED" for s in statuses.values()) or time.monotonic() > deadline:
            raise RuntimeError(f"applications not running after {timeout_s:g} s: {statuses}")
        time.sleep(0.5)


@ray.remote(num_cpus=0)
def _engine_stats(app: str, deployment: str, timeout_s: float) -> dict[str, int]:
    return serve.get_deployment_handle(deployment, app_name=app).stats.remote().result(timeout_s=timeout_s)


def engine_stats(app: str, deployment: str, timeout_s: float = 30) -> dict[str, int]:
    """An LLMServer's engine load (LLMServer.stats), asked from a Ray worker of the cluster. Not from the
    test process: Serve's handle machinery there (its router thread, long-poll clients) outlives the cluster
    it first served, and a later module's requests through it could wait without end (seen in CI)."""
    return ray.get(_engine_stats.remote(app, deployment, timeout_s), timeout=timeout_s + 10)


def replica_actors(app: str, deployment: str) -> list[str]:
    """The Ray actor names of a deployment's replicas (namespace "serve"), to kill one as a crash would."""
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}#")]


def own_ray_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) for a `serve run` that starts a Ray of its own. Without an address,
    Ray joins the cluster named in /tmp/ray/ray_current_cluster (`ray start` writes it, and it outlives a
    node that was killed); "local" always starts a new one."""
    return {**(os.environ if env is None else env), "RAY_ADDRESS": "local"}


def default_sigint() -> None:
    # A background job inherits SIGINT as ignored; serve run needs it to shut Serve and Ray down.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_server(command: list[str], log_path: Path, env: dict[str, str], health_url: str, timeout_s: float,
                 cwd: Path | None = None) -> subprocess.Popen:
    """`command` in a session of its own, its output appended to `log_path`, once `health_url` answers 200;
    RuntimeError with the log's tail if it exits first or `timeout_s` passes."""
    with open(log_path, "a") as log:
        proc = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=default_sigint)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{command[0]} exited with {proc.returncode}:\n{log_path.read_text()[-5000:]}")
            try:
                if httpx.get(health_url, timeout=5).status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{health_url} not healthy after {timeout_s:g} s:\n{log_path.read_text()[-5000:]}")
            time.sleep(1)
    except BaseException:
        stop_server(proc)
        raise


def stop_server(proc: subprocess.Popen, timeout_s: float = 90) -> None:
    """SIGINT (serve run then shuts Serve and its local Ray cluster down), SIGKILL to its group if it hangs."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def local_stack(workdir: Path, edit: Callable[[dict[str, Any]], None] | None = None) -> Iterator[dict[str, Any]]:
    """`serve run` on deploy_configs/local.yaml (changed by `edit`, if given), on a free port."""
    config = yaml.safe_load((ROOT / "deploy_configs/local.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    if edit:
        edit(config)
    config_path = workdir / "local.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = workdir / "serve.log"
    serve_cli = Path(sys.executable).with_name("serve")
    # Always a fresh local cluster, never one a developer has running.
    # As `make run` starts it: what `raystack start` exports, for the Ray that serve run starts.
    env = own_ray_env() | RAY_START_ENV
    base = f"http://127.0.0.1:{port}"
    proc = start_server([str(serve_cli), "run", str(config_path)], log_path, env, f"{base}/health",
                        STARTUP_TIMEOUT_S, cwd=ROOT)
    try:
        yield {"base_url": base, "log": log_path, "proc": proc}
    finally:
        stop_server(proc)


def replica_ids(app: str) -> list[str]:
    """The unique ids of the LLMServer replicas of raystack service `app`'s backends, as Serve names their actors."""
    return [actor["name"].rsplit("#", 1)[1] for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith(f"SERVE_REPLICA::{app}.") and "#LLMServer" in actor["name"]]


def replica_actor(app: str, unique_id: str):
    """The actor of replica `unique_id` of a deployment of raystack service `app`."""
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(f"SERVE_REPLICA::{app}") and actor["name"].endswith(f"#{unique_id}"):
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise LookupError(f"no replica {unique_id} in {app}")
