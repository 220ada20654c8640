"""The router's access log: a line per request, gathered in memory and written to the replica process's
stderr twice a second.

Ray's log monitor shows a replica's stderr in `serve run`'s console, and the dashboard shows it as the
replica's log (worker-*.err). A line written per request, through Python's logging (as Serve's logger did) or
straight to stderr, cost 4-5% of the short requests a router replica carries at concurrency 32 on 2 cores
(README, Router overhead); one write per half second costs a string and an append per request.
"""

from __future__ import annotations

import asyncio
import atexit
import sys
from datetime import datetime
from typing import TextIO

FLUSH_S = 0.5


class AccessLog:
    def __init__(self, stream: TextIO | None = None):
        # The process's own stderr: in a replica Serve replaces sys.stderr with a stream into its logger.
        self.stream = stream or sys.__stderr__
        self.lines: list[str] = []
        self.flushing: asyncio.TimerHandle | None = None
        atexit.register(self.flush)  # a replica that stops keeps its last lines

    def write(self, message: str) -> None:
        self.lines.append(f"INFO {datetime.now().isoformat(' ', 'milliseconds')} access -- {message}\n")
        if self.flushing is None:
            try:
                self.flushing = asyncio.get_running_loop().call_later(FLUSH_S, self.flush)
            except RuntimeError:  # no event loop here: now
                self.flush()

    def flush(self) -> None:
        self.flushing = None
        if self.lines:
            text = "".join(self.lines)
            self.lines.clear()
            self.stream.write(text)
            self.stream.flush()
