"""This machine's processes, read from /proc: for tests that check what outlives what."""

from __future__ import annotations

from pathlib import Path


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            found[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), command)
    return found


def descendants(table: dict[int, tuple[int, str]], pid: int) -> set[int]:
    """Every process below `pid` in `table` (processes())."""
    below, parents = set(), [pid]
    while parents:
        parent = parents.pop()
        children = [child for child, (ppid, _) in table.items() if ppid == parent]
        below.update(children)
        parents += children
    return below


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
