"""The stack's Ray node goes while vLLM serves: what `ray stop --force` or a crashed raylet does. This
module runs last in its package (the stack does not come back).

vLLM's EngineCore does not watch its parent, and with the node gone nobody kills the replica's process
group (Ray does that only while the node lives). raystack's guard (engines/supervised.py) stops what the
engine spawned once the replica is gone; an EngineCore left behind holds the model's memory, and on an NPU
the chip, until someone finds it.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.processes import alive, descendants, processes

pytestmark = pytest.mark.e2e

GONE_WITHIN_S = 30  # the guard's SIGTERM, and its SIGKILL 10 s later


def kill(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_until_gone(pids: set[int], within_s: float = GONE_WITHIN_S) -> dict[int, bool]:
    deadline = time.monotonic() + within_s
    while [pid for pid in pids if alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.2)
    return {pid: alive(pid) for pid in pids}


def test_the_engine_core_goes_with_the_ray_node_it_ran_under(options_server):
    table = processes()
    node = descendants(table, options_server["proc"].pid) | {options_server["proc"].pid}
    [replica] = [pid for pid in node if table[pid][1].startswith("ray::ServeReplica:raystack.smollm2.vllm:LLMServer")]
    engine = descendants(table, replica)
    assert any("EngineCore" in table[pid][1] for pid in engine), "no EngineCore under the replica"
    # As `ray stop --force` does: Ray's own processes first (raylet, GCS, ...; also `serve run`), the
    # workers after. Killed together, a raylet still alive could clean the replica's group up itself.
    kill(node - engine - {replica})
    wait_until_gone(node - engine - {replica})
    kill({replica})
    left = {pid: table[pid][1].strip() for pid, still in wait_until_gone(engine).items() if still}
    assert not left, f"the engine's processes outlived the Ray node: {left}"
