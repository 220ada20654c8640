"""Keep serving processes off the cores the vLLM CPU engine computes on.

vLLM's CPU worker binds its OpenMP threads to some cores and leaves the rest for everything else
(VLLM_CPU_OMP_THREADS_BIND=auto reserves one). Ray's processes (raylet, GCS, dashboard, Serve's proxy,
the router, this replica and the EngineCore it started) float over every core, so the scheduler keeps
putting them on the engine's cores and every decode step waits for them. Moving the floating ones off
measured +14-16% output tokens/s at concurrency 6 on a 2-core machine (README, benchmark).

Only processes that float over every core are moved: a process something already bound (another
engine's worker) keeps its cores, so this is safe with several engines on one node.
"""

from __future__ import annotations

import logging
import os

import psutil

logger = logging.getLogger("ray.serve")

ENGINE_WORKER_MARK = "VLLM::Worker"
# Process titles and command lines of Ray's own processes on a node, and vLLM's engine-core process.
RAY_PROCESS_MARKS = ("ray::", "raylet", "gcs_server", "ray/dashboard", "ray/_private", "VLLM::EngineCore")


def _cmdline(proc: psutil.Process) -> str:
    return " ".join(proc.cmdline())


def engine_cores(worker_mark: str = ENGINE_WORKER_MARK) -> set[int]:
    """Cores that vLLM CPU workers on this node have bound themselves to."""
    every = set(range(psutil.cpu_count()))
    bound: set[int] = set()
    for proc in psutil.process_iter():
        try:
            if worker_mark in _cmdline(proc):
                cores = set(proc.cpu_affinity())
                if cores != every:
                    bound |= cores
        except psutil.Error:
            continue
    return bound


def move_off_engine_cores(
    worker_mark: str = ENGINE_WORKER_MARK, process_marks: tuple[str, ...] = RAY_PROCESS_MARKS
) -> int:
    """Pin floating Ray processes (every thread) to the cores no engine computes on; how many moved."""
    every = set(range(psutil.cpu_count()))
    spare = every - engine_cores(worker_mark)
    if spare in (set(), every):
        return 0
    moved = 0
    for proc in psutil.process_iter():
        try:
            cmd = _cmdline(proc)
            if worker_mark in cmd or not any(m in cmd for m in process_marks):
                continue
            if set(proc.cpu_affinity()) != every:
                continue
            for tid in os.listdir(f"/proc/{proc.pid}/task"):
                try:
                    os.sched_setaffinity(int(tid), spare)
                except OSError:  # thread ended, or not ours to move
                    pass
            moved += 1
        except (psutil.Error, OSError):
            continue
    if moved:
        logger.info("moved %d Ray processes to cores %s, off the engine's cores", moved, sorted(spare))
    return moved
