"""The npu-smi boundary: running `npu-smi` (bounded, killed whole if it hangs) and reading its output.

Parsers take text and give values; they are lenient about indentation (real output indents with TABs,
pasted copies with spaces) and about `NA`. What a node registers from them is decided in npu.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
from dataclasses import dataclass

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class NPUChip:
    npu_id: int  # card id as npu-smi prints it (not contiguous: 1,2,4,5 or 0,96,32768,32896 in containers)
    chip_id: int  # chip index on the card
    logic_id: int | None  # device id of ASCEND_RT_VISIBLE_DEVICES / MindIE npuDeviceIds
    name: str  # npu-smi's name, e.g. "910B3", "310P3", "Ascend 910A" (from `info -m`)
    health: str  # OK / Warning / Alarm / Critical / ... as npu-smi prints it; "unchecked" without npu-smi
    hbm_mb: int | None  # total HBM (on 310P: the chip's memory) in MB

    def label(self) -> str:
        return f"NPU {self.npu_id} chip {self.chip_id} (logic id {self.logic_id})"


# --- parsers: text in, values out; lenient about indentation (TAB or spaces) and `NA` ---------------------


def parse_info(text: str) -> list[NPUChip]:
    """The chip table of `npu-smi info`: two rows per chip, then the process table (ignored).

        | NPU   Name       | Health | Power(W)  Temp(C)          Hugepages-Usage(page) |  <- card row
        | Chip  [Device]   | Bus-Id | AICore(%) Memory-Usage(MB) [HBM-Usage(MB)]       |  <- chip row
    """
    chips: list[NPUChip] = []
    # The label after "Chip" in the second header: "Device" is the logic id (310P); "Phy-ID" (A3) is not.
    second_label = ""
    card: tuple[int, str, str] | None = None  # (npu_id, name, health) of a card row awaiting its chip row

    def add(chip_cells: list[str] | None) -> None:
        npu_id, name, health = card  # type: ignore[misc]
        words = chip_cells[0].split() if chip_cells else []
        chip_id = int(words[0]) if words else sum(c.npu_id == npu_id for c in chips)
        logic = int(words[1]) if second_label == "Device" and len(words) > 1 and words[1].isdigit() else None
        total = _trailing_total(chip_cells[2]) if chip_cells and len(chip_cells) > 2 else None
        chips.append(NPUChip(npu_id, chip_id, logic, name, health, total))

    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("+"):  # a separator: a card row without its chip row is complete
            if card is not None:
                add(None)
                card = None
            continue
        if not line.startswith("|"):
            continue
        if "Process id" in line or "Process name" in line:
            break  # the process table: its rows look like chip rows
        cells = [c.strip() for c in line.strip("|").split("|")]
        words = cells[0].split()
        if "Health" in line and "Name" in line:
            continue
        if words[:1] == ["Chip"]:
            second_label = words[1] if len(words) > 1 else ""
            continue
        if len(cells) < 3 or not words or not words[0].isdigit():
            continue  # the version banner, "No running processes found", anything else
        if card is None:
            card = (int(words[0]), " ".join(words[1:]), cells[1])
        else:
            add(cells)
            card = None
    if card is not None:
        add(None)
    return chips


def _trailing_total(cell: str) -> int | None:
    """Total MB from the last `used / total` of a chip row's third cell.

    The last column is HBM-Usage where the table has one (910, 910B, A3) and Memory-Usage where it does
    not (310P); on 910-class chips Memory-Usage is the control CPU's DDR, never what a model can use.
    `0` (910B's Memory-Usage) and `NA` mean unknown.
    """
    m = re.search(r"(\d+)\s*/\s*(\d+)$", cell.strip())
    return (int(m.group(2)) or None) if m else None


_INFO_M_ROW = re.compile(r"^(\d+)\s+(\d+)\s+(\d+|-)\s+(\S.*?)\s*$")


def parse_info_m(text: str) -> dict[tuple[int, int], tuple[int | None, str]]:
    """`npu-smi info -m`: (npu_id, chip_id) -> (logic id, chip name); the `Mcu` rows have logic id `-` (None)."""
    mapping: dict[tuple[int, int], tuple[int | None, str]] = {}
    for raw in text.splitlines():
        m = _INFO_M_ROW.match(raw.strip())
        if m:
            npu, chip, logic, name = m.groups()
            mapping[(int(npu), int(chip))] = (None if logic == "-" else int(logic), name)
    return mapping


def parse_key_values(text: str) -> dict[str, str]:
    """`Key : Value` lines of `npu-smi info -t board|usages|memory|health|...`.

    A line with an empty key continues the previous value (`-t health` prints one line per error).
    Keys repeated by later chip blocks of a multi-chip card keep their first value.
    """
    values: dict[str, str] = {}
    last: str | None = None
    for raw in text.splitlines():
        key, sep, value = raw.strip().partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if not key:
            if last is not None and value:
                values[last] = f"{values[last]}\n{value}"
            continue
        if key not in values:
            values[key] = value
            last = key
        else:
            last = None
    return values


def parse_visible_devices(value: str) -> tuple[list[int], list[str]]:
    """ASCEND_RT_VISIBLE_DEVICES as Ray reads it ("" and "NoDevFiles" mean none): (ids, unparseable items)."""
    if value.strip() in ("", "NoDevFiles"):
        return [], []
    ids: list[int] = []
    bad: list[str] = []
    for item in value.split(","):
        item = item.strip()
        if item.isdigit():
            ids.append(int(item))
        else:
            bad.append(item)
    return ids, bad


# --- the npu-smi boundary ------------------------------------------------------------------------------


class NpuSmiError(RuntimeError):
    """npu-smi is missing, failed or hung; the message says which and how."""


class NpuSmi:
    def __init__(self, exe: str, timeout: float):
        self.exe = exe
        self.timeout = timeout
        self.hung: set[str] = set()  # query kinds that timed out once: don't wait for them on every chip

    def run(self, *args: str) -> str:
        cmd = f"npu-smi {' '.join(args)}"
        try:
            proc = subprocess.Popen(
                [self.exe, *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",
                start_new_session=True,
            )
        except OSError as e:
            raise NpuSmiError(f"cannot run {self.exe}: {e.strerror or e}") from e
        try:
            out, err = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            # npu-smi can hang on a wedged driver: kill its whole session so nothing keeps the pipes open.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise NpuSmiError(f"`{cmd}` timed out after {self.timeout:g} s") from None
        if proc.returncode != 0:
            detail = next((ln.strip() for ln in (err + "\n" + out).splitlines() if ln.strip()), "no output")
            raise NpuSmiError(f"`{cmd}` exited with {proc.returncode}: {detail}")
        return out

    def query(self, kind: str, chip: NPUChip) -> dict[str, str]:
        """`npu-smi info -t <kind> -i <card> -c <chip>` as key/values; {} if it fails."""
        if kind in self.hung:
            return {}
        try:
            return parse_key_values(self.run("info", "-t", kind, "-i", str(chip.npu_id), "-c", str(chip.chip_id)))
        except NpuSmiError as e:
            if "timed out" in str(e):
                self.hung.add(kind)
            logger.debug("%s", e)
            return {}
