"""How raystack's processes run: the Ray Serve settings they start with, their CPU priority, and the NPUs
their engines see.

Serve's fast path. RAY_SERVE_THROUGHPUT_OPTIMIZED=1 sends handle calls over gRPC, runs user code and the
handle's router on the replica's own event loop (no thread hop per streamed chunk) and buffers access
logs. On a 2-core machine it doubled the streamed chunks/s one router replica carries and halved the
TTFT Serve adds (README, "Router overhead"; scripts/bench_router.py). Direct ingress, also part of the
preset, stays off: the router listens itself (router/listener.py says why Serve's own ways round its proxy
do not fit), and with direct ingress Ray 2.60 would also open a port per LLMServer replica, which is the
ingress of its backend application, and drain each for at least 30 s. Logs still go to stderr, where
`serve run` shows them. Serve reads these when a process imports it, so they must be in the environment of Ray's
processes: build_router and build_backend set them in the Router's and every LLMServer's runtime_env;
`raystack start` and `make run` export them before Ray starts (RAY_START_ENV), so the HTTP proxy runs with
them too. Not in a driver that calls handles synchronously: the preset moves the handle's router onto the
caller's event loop.

CPU priority. Ray starts its workers at nice 15 (`RAY_worker_niceness`) so its control plane wins CPU
contention. For an inference replica that is the wrong trade: the engine, and every hop a token
crosses, then loses the CPU to anything at normal priority (a load generator, a log shipper) and decode
slows down. Serving processes put themselves back to normal priority; the processes they start (vLLM's
EngineCore and workers, MindIE's daemon) inherit it.

NPUs. `raystack start` exports RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES=1 (vllm-ascend's multi-node
guide requires it, so that vLLM's Ray executor sets each worker's devices itself), so Ray leaves
ASCEND_RT_VISIBLE_DEVICES at the node's whole list in every worker. An engine the replica runs in-process
opens device 0 of that list (vLLM's uniproc executor at world size 1 uses local rank 0:
vllm/v1/executor/uniproc_executor.py, `_distributed_args`), so every one-NPU replica would take the node's
first chip whatever Ray granted. A replica that holds NPUs therefore narrows the variable to its grant
before its engine starts.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("ray.serve")

SERVE_FAST_PATH_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
    "RAY_SERVE_LOG_TO_STDERR": "1",
    # The preset sends requests between deployments over gRPC, to node_ip:port channels Serve opens
    # without disabling gRPC's proxy support (request_router/replica_wrapper.py, init_grpc_channel). On a
    # node that exports http_proxy / https_proxy, as clusters behind a corporate proxy do, every request
    # would go to the proxy and fail ("replica temporarily unavailable", forever). gRPC skips the proxy for
    # targets in no_grpc_proxy (CIDR blocks since gRPC 1.51: its doc/core/default_http_proxy_mapper.md):
    # every IP. HTTP clients (model downloads) still use the proxy.
    "no_grpc_proxy": "0.0.0.0/0,::/0",
}

NICENESS_ENV = "RAY_worker_niceness"

# Serve's controller reconciles every deployment each RAY_SERVE_CONTROL_LOOP_INTERVAL_S (0.1 s by default),
# and each pass asks the GCS for every node's info, resource usage and draining state (Ray 2.60,
# serve/_private/cluster_node_info_cache.py, ClusterNodeInfoCache.update). Idle on a 2-core head that cost
# 2.3% of a core in the controller and 1% in the GCS; at 0.5 s, 0.7% and 0.5% (README, "raystack vs
# vLLM's own server"). That CPU is taken from the engine wherever the head also serves. What waits for a
# pass (a replica's start, health check result or death noticed, an autoscaling decision) waits up to
# 0.4 s more; autoscaling's delays are wall-clock seconds (autoscaling_policy.py), not passes. Ray
# documents the knob (PR 45063, serve/advanced-guides/performance.md). Only the head's controller reads it.
SERVE_CONTROLLER_ENV = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5"}

# What `raystack start` and `make run` export before Ray starts: its workers at normal priority, Serve's
# controller and fast path.
RAY_START_ENV = {NICENESS_ENV: "0", **SERVE_CONTROLLER_ENV, **SERVE_FAST_PATH_ENV}
# For a Ray that a Python driver starts itself (the tests, the bench scripts): the same, less Serve's fast
# path, which would make the driver's own synchronous handle calls fail (no event loop there). Its replicas
# still get the fast path, from their runtime_env (app.py).
LOCAL_RAY_ENV = {key: value for key, value in RAY_START_ENV.items() if key not in SERVE_FAST_PATH_ENV}

VISIBLE_NPUS_ENV = "ASCEND_RT_VISIBLE_DEVICES"  # what Ray's NPU manager and the CANN runtime read


def restore_normal_priority() -> None:
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if current <= 0:
        return
    try:
        # Linux keeps a nice value per thread: reset every thread of this process, not just this one.
        for tid in os.listdir("/proc/self/task"):
            try:
                os.setpriority(os.PRIO_PROCESS, int(tid), 0)
            except ProcessLookupError:  # the thread ended meanwhile
                pass
    except PermissionError:
        logger.warning(
            "this replica runs at nice %d and may not raise its priority; start Ray with %s=0 in the "
            "environment (raystack start does) so serving does not lose the CPU to other processes",
            current, NICENESS_ENV,
        )


def pin_granted_npus() -> list[str]:
    """Narrow ASCEND_RT_VISIBLE_DEVICES to the NPUs Ray granted this process (its ids as Ray numbers them,
    which are the node's device ids); returns them. No NPUs granted: nothing changes."""
    import ray

    granted = sorted(ray.get_runtime_context().get_accelerator_ids().get("NPU", []), key=int)
    if granted:
        os.environ[VISIBLE_NPUS_ENV] = ",".join(granted)
    return granted
