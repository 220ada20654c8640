"""Processes an engine starts and owns, and no orphans: a supervised server, or an engine's own children;
and the free ports they are told to listen on (free_ports).

A SupervisedProcess runs in a new session, so one signal reaches it and every process it spawns (MindIE's
daemon starts a backend process per NPU). A guard process holds the read end of a pipe whose write end only
the owner has: when the owner exits for any reason, even SIGKILL or a crash that skips every `finally`,
the pipe closes and the guard terminates the whole group. Stopping it ourselves first makes the guard
find nothing left to kill.

`guard_children` puts the same guard over the processes an engine library spawned itself (vLLM's
EngineCore and its workers, in the replica's own process group): Ray kills that group when a worker dies
while its node lives, but when the node goes first (`ray stop --force`, a raylet crash) nobody does, and
an EngineCore that outlives its replica holds the model's memory (on an NPU, the chip). vLLM's EngineCore
has no parent-death check of its own (its workers watch EngineCore, EngineCore watches nobody): still open
upstream as vllm-project/vllm#55510 (2026-09, on 0.28), so in the 0.23.0 the `ascend` extra pins and the
0.32.0 CPU build alike; seen here on 0.32.0. Those are named by
pid and start time, so a pid reused since is never signalled.

The guard detaches from the owner (it forks and its parent exits): Ray kills a worker's direct children
when it stops the worker (ray.kill, which Serve uses on replicas; RAY_kill_child_processes_on_worker_exit,
on by default), which would take the guard and the daemon but leave the daemon's own children, holding
their NPUs, with no one to stop them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Mapping

TAIL_LINES = 40  # output lines kept to explain a failure

# Runs as `python -c GUARD grace_s target...`; blocks until its stdin reaches end of file. A target is
# `group:PGID` or `pid:PID:START` (START: field 22 of /proc/PID/stat, the process's start time).
GUARD = r"""
import os, signal, sys, time
if os.fork():
    os._exit(0)  # detached: no longer a child of the owner
grace, targets = float(sys.argv[1]), sys.argv[2:]
sys.stdin.buffer.read()
def same(pid, start):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[19] == start and fields[0] != "Z"
def signal_all(sig):  # whether any target was there to signal
    found = False
    for target in targets:
        kind, _, rest = target.partition(":")
        try:
            if kind == "group":
                os.killpg(int(rest), sig)
            else:
                pid, start = rest.split(":")
                if not same(pid, start):
                    continue
                os.kill(int(pid), sig)
            found = True
        except (ProcessLookupError, PermissionError):
            pass
    return found
if signal_all(0):
    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while signal_all(0) and time.monotonic() < deadline:
        time.sleep(0.1)
    signal_all(signal.SIGKILL)
"""


def start_guard(targets: list[str], grace_s: float) -> subprocess.Popen:
    """A detached guard over `targets`: they get SIGTERM, then SIGKILL after `grace_s`, once the returned
    Popen's stdin is closed, by us or by this process's end. Keep the Popen: collecting it closes stdin."""
    guard = subprocess.Popen(
        [sys.executable, "-I", "-c", GUARD, str(grace_s), *targets],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    guard.wait()  # the parent that forked it, gone at once; the guard runs on
    return guard


def _children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of `pid`'s descendants, from /proc."""
    table: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table.setdefault(int(fields[1]), []).append((int(entry.name), fields[19]))
    found, parents = [], [pid]
    while parents:
        for child in table.get(parents.pop(), []):
            found.append(child)
            parents.append(child[0])
    return found


def guard_children(grace_s: float = 10.0) -> subprocess.Popen | None:
    """A guard over the processes this one has spawned so far (and theirs): they go when it goes."""
    children = _children_of(os.getpid())
    return start_guard([f"pid:{pid}:{start}" for pid, start in children], grace_s) if children else None


class SupervisedProcess:
    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], cwd: str | None = None,
                 log: logging.Logger | None = None, kill_grace_s: float = 10.0, watch_for: str | None = None,
                 pass_fds: tuple[int, ...] = ()):
        """`pass_fds`: descriptors the process and its children inherit (an NPU claim: npu_claim.py)."""
        self.name = name
        self.argv = argv
        self.env = dict(env)
        self.cwd = cwd
        self.log = log or logging.getLogger(__name__)
        self.kill_grace_s = kill_grace_s
        self.process: asyncio.subprocess.Process | None = None
        self.guard: subprocess.Popen | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._reader: asyncio.Task | None = None
        self.watch_for = watch_for
        self.pass_fds = pass_fds
        self.seen = asyncio.Event()  # set once a line contains `watch_for`

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def returncode(self) -> int | None:
        """None while it runs (or before it started); its exit status after."""
        return self.process.returncode if self.process else None

    def tail(self) -> str:
        return "\n".join(self.lines) or "(it printed nothing)"

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            *self.argv, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, pass_fds=self.pass_fds,
        )
        # The new session's id is the child's pid: the group to signal.
        self.guard = await asyncio.to_thread(start_guard, [f"group:{self.process.pid}"], self.kill_grace_s)
        self._reader = asyncio.create_task(self._stream_output())

    async def _stream_output(self) -> None:
        assert self.process and self.process.stdout
        while line := await self.process.stdout.readline():
            text = line.decode(errors="replace").rstrip()
            self.lines.append(text)
            if self.watch_for and self.watch_for in text:
                self.seen.set()
            self.log.info("[%s] %s", self.name, text)

    async def wait(self, timeout: float | None = None) -> int | None:
        """The exit status, or None if it still runs after `timeout` seconds."""
        if self.process is None:
            return None
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            return None

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    async def stop(self, grace_s: float | None = None) -> None:
        """SIGTERM to the group, SIGKILL after `grace_s`; then whatever of the group outlived its leader."""
        if self.process is None:
            return
        grace = self.kill_grace_s if grace_s is None else grace_s
        if self.process.returncode is None:
            self._signal_group(signal.SIGTERM)
            if await self.wait(grace) is None:
                self.log.warning("%s did not exit %.0f s after SIGTERM: SIGKILL to its process group", self.name, grace)
                self._signal_group(signal.SIGKILL)
                await self.process.wait()
        self._signal_group(signal.SIGKILL)  # children that outlived the leader
        if self._reader is not None:
            try:
                await asyncio.wait_for(self._reader, 5)
            except TimeoutError:  # a surviving grandchild still holds the pipe open
                self._reader.cancel()
        if self.guard is not None:
            self.guard.stdin.close()  # the guard wakes, finds the group gone, exits
            self.guard = None


def free_ports(count: int = 1) -> list[int]:
    """`count` distinct TCP ports free now on every address (all held open while choosing, so none repeats),
    for a process an engine starts to listen on: MindIE's daemon refuses a port in use on any address,
    whichever it listens on (MindIE-LLM http_server.cpp, IsPortUsed binds INADDR_ANY); vLLM's KV event
    publisher binds tcp://*:PORT. Should another process take one before it binds, that engine fails to
    start and Serve starts the replica again, on other ports."""
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(count):
            s = held.enter_context(socket.socket())
            s.bind(("", 0))
            ports.append(s.getsockname()[1])
        return ports
