"""Floating serving processes move off the cores a CPU engine worker bound; bound ones stay put.
Real processes, told apart by their command lines as the real ones are (marks unique to this test, and
without "ray::": a real engine of the e2e stack, alive for the whole session, moves those on its own)."""

import os
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from raystack.engines.vllm.cpu_cores import move_off_engine_cores

pytestmark = pytest.mark.skipif(psutil.cpu_count() < 2, reason="needs 2 cores")


def sleeper(mark: str, cores: set[int] | None = None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", mark])
    if cores:
        os.sched_setaffinity(proc.pid, cores)
    return proc


def test_floating_processes_leave_the_engine_cores():
    tag = uuid.uuid4().hex
    every = set(range(psutil.cpu_count()))
    worker = sleeper(f"worker-{tag}", {0})
    floating = sleeper(f"floating-{tag}")
    other_engine = sleeper(f"other-{tag}", {1})
    unrelated = sleeper(f"someone-else-{tag}")
    try:
        time.sleep(0.3)
        moved = move_off_engine_cores(worker_mark=f"worker-{tag}", process_marks=(f"floating-{tag}", f"other-{tag}"))
        assert moved == 1
        assert os.sched_getaffinity(floating.pid) == every - {0}
        assert os.sched_getaffinity(worker.pid) == {0}
        assert os.sched_getaffinity(other_engine.pid) == {1}  # already bound: left alone
        assert os.sched_getaffinity(unrelated.pid) == every  # not a serving process
        assert move_off_engine_cores(worker_mark=f"worker-{tag}", process_marks=(f"floating-{tag}",)) == 0
    finally:
        for p in (worker, floating, other_engine, unrelated):
            p.kill()
            p.wait()


def test_nothing_moves_without_a_bound_engine_worker():
    tag = uuid.uuid4().hex
    floating = sleeper(f"floating-{tag}")
    try:
        time.sleep(0.3)
        assert move_off_engine_cores(worker_mark=f"worker-{tag}", process_marks=(f"floating-{tag}",)) == 0
        assert os.sched_getaffinity(floating.pid) == set(range(psutil.cpu_count()))
    finally:
        floating.kill()
        floating.wait()
