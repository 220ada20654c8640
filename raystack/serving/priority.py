"""CPU priority of serving processes.

Ray starts its workers at nice 15 (`RAY_worker_niceness`) so its control plane wins CPU contention. For
an inference replica that is the wrong trade: the engine, and every hop a token crosses, then loses the
CPU to anything at normal priority (a load generator, a log shipper) and decode slows down. Serving
processes put themselves back to normal priority; the processes they start (vLLM's EngineCore and
workers, MindIE's daemon) inherit it.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("ray.serve")

NICENESS_ENV = "RAY_worker_niceness"


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
