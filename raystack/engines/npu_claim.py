"""Which engine holds an NPU of this node, as flock(2) sees it.

Ray frees a dead replica's NPUs at once, but its engine's process group goes only when its guard has
taken it down (SIGTERM, then SIGKILL after the grace period: engines/supervised.py), and until then it
still holds the chip's memory. A replacement placed on the same chips would start beside it and fail to
load, or worse, share the chip. So an engine's NPUs are claimed before it starts: one lock file per chip,
taken by the replica and inherited by the engine's processes (pass_fds). The kernel releases it only when
the last process holding it has exited, whatever way it went; the replacement waits for that.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import tempfile
import time
from pathlib import Path

CLAIMS_DIR = Path(tempfile.gettempdir()) / "raystack-npu-claims"
POLL_S = 0.2


class NPUClaimTimeout(RuntimeError):
    """A chip is still held by another engine after the wait; the message names it and its holder."""


class NPUClaim:
    """The claim on `npu_ids` of the node at `node_ip` (a machine may run several simulated Ray nodes)."""

    def __init__(self, node_ip: str, npu_ids: list[int]):
        self.paths = [CLAIMS_DIR / node_ip / f"npu{i}.lock" for i in sorted(set(npu_ids))]
        self.fds: list[int] = []

    async def acquire(self, timeout_s: float) -> float:
        """Every chip's lock, waiting up to `timeout_s` for an engine that still holds one; returns how long it
        waited. The locks are taken in chip order, so two claims never wait on each other."""
        started = time.monotonic()
        deadline = started + timeout_s
        try:
            for path in self.paths:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
                self.fds.append(fd)
                while not _try_lock(fd):
                    if time.monotonic() > deadline:
                        raise NPUClaimTimeout(
                            f"NPU {path.stem.removeprefix('npu')} is still held by process {_holder(fd)} "
                            f"(the engine of a replica that is gone?) after {timeout_s:g} s; it should have "
                            f"exited by now: check it with `npu-smi info`, and stop it if it hangs")
                    await asyncio.sleep(POLL_S)
        except BaseException:
            self.release()
            raise
        self.held_by(os.getpid())
        return time.monotonic() - started

    def held_by(self, pid: int) -> None:
        """Names the engine's process as the holder (what a waiting replica reports)."""
        for fd in self.fds:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(pid).encode(), 0)

    def release(self) -> None:
        """This process's hold; the engine's processes keep theirs until they exit."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _holder(fd: int) -> str:
    return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
