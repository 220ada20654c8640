"""Ascend NPU discovery for one node: which chips this node should register with Ray, and why not the rest.

Sources, best first:

    npu-smi info                 the chip table: card (NPU) id, chip id, name, health, HBM or memory total
    npu-smi info -m              logic ids (what ASCEND_RT_VISIBLE_DEVICES counts) and chip names
    npu-smi info -t T -i N -c C  per chip, only to fill a gap the table left (board: name, usages/memory:
                                 HBM, health: health when the table is empty)
    /dev/davinci[0-9]*           a count only, when npu-smi is missing or fails (Ray's own fallback)
    ASCEND_RT_VISIBLE_DEVICES    the ids alone, when there is nothing else

Health policy. npu-smi reports `OK` or one of three alarm levels: `Warning` (minor), `Alarm` (major) and
`Critical`. `OK` chips are registered. `Alarm`, `Critical` and anything unrecognised (`NA`, `UNKNOWN`, an
empty cell, a failed `-t health` query) are excluded. `Warning` chips are kept by default and logged:
a minor alarm is a threshold crossed (temperature, power), not a failed chip. Dropping them would shrink
the node below a whole-server placement group, e.g. tensor-parallel 8 on an 8-NPU server, and Ray itself
registers every chip whatever its health. `discover(allow_warning=False)` excludes them as well.

Every detected chip ends up either in `NodeNPUs.healthy` or in `NodeNPUs.excluded` with its reason, and
every exclusion is logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping

logger = logging.getLogger(__name__)

VISIBLE_DEVICES_ENV = "ASCEND_RT_VISIBLE_DEVICES"  # the variable Ray's NPUAcceleratorManager reads and sets
OK = "OK"
WARNING = "Warning"
UNCHECKED = "unchecked"  # the /dev and env sources have nothing to ask about health
UNKNOWN = "unknown"  # npu-smi was asked about health and did not answer
DEFAULT_TIMEOUT_S = 10.0
# Names that are no chip type: Huawei's doc samples print `xxx`; `Mcu` is the management MCU in `info -m`.
_PLACEHOLDER_NAMES = {"", "-", "na", "mcu"}


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


@dataclass
class NodeNPUs:
    healthy: list[NPUChip]  # the chips to register, ordered by logic id
    excluded: list[tuple[NPUChip, str]]  # detected but not registered, and why ("health Critical", ...)
    chip_type: str | None  # Ray's accelerator type of the healthy chips, e.g. "Ascend910B3"
    hbm_gib_per_npu: float | None  # the smallest healthy chip's, so a replica sized to it fits on any
    source: str  # "npu-smi" | "/dev/davinci" | "ASCEND_RT_VISIBLE_DEVICES" | "none"
    notes: list[str] = field(default_factory=list)  # fallbacks taken, disagreements, Warning chips kept

    @property
    def count(self) -> int:
        return len(self.healthy)

    def visible_devices(self) -> str:
        """ASCEND_RT_VISIBLE_DEVICES for exactly the healthy chips."""
        return ",".join(str(c.logic_id) for c in self.healthy if c.logic_id is not None)


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


def ray_chip_type(name: str) -> str | None:
    """Ray's accelerator type for an npu-smi chip name: "910B3" -> "Ascend910B3", "Ascend 910A" -> "Ascend910A".

    Ray names the type with `acl.get_soc_name()` ("Ascend910B3", "Ascend310P3"), so `accelerator_type:<type>`
    matches what Ray registers where npu-smi names the SoC. A3 is the exception: npu-smi prints "Ascend910"
    while the SoC name carries a suffix (e.g. "Ascend910_9392"), so there the two differ.
    """
    compact = "".join(name.split())
    if compact.lower() in _PLACEHOLDER_NAMES or "xxx" in compact.lower():
        return None
    return compact if compact.lower().startswith("ascend") else f"Ascend{compact}"


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


class _NpuSmi:
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


def _capacity_mb(values: Mapping[str, str]) -> int | None:
    # HBM first: 910-class chips also report the control CPU's DDR. 310P has DDR only.
    for key in ("HBM Capacity(MB)", "DDR Capacity(MB)", "Memory Capacity(MB)"):
        value = values.get(key, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def _from_npu_smi(smi: _NpuSmi, note: Callable[[str], None]) -> list[NPUChip]:
    """The chips npu-smi lists, with logic ids and names merged from `info -m`; [] if npu-smi cannot tell."""
    try:
        table = parse_info(smi.run("info"))
    except NpuSmiError as e:
        note(f"{e}; falling back to /dev/davinci*")
        return []
    try:
        mapping = parse_info_m(smi.run("info", "-m"))
    except NpuSmiError as e:
        mapping = {}
        if table:
            note(f"{e}; logic ids taken from the table's Device column, else the chips' order")

    if not table:
        listed = sorted(((k, v) for k, v in mapping.items() if v[0] is not None), key=lambda kv: kv[1][0])
        if not listed:
            note("npu-smi info listed no NPUs; falling back to /dev/davinci*")
            return []
        # A real capture (mind-cluster FaultDiag) shows an empty `npu-smi info` next to a full `info -m`.
        note("npu-smi info printed no chip table; chips taken from `npu-smi info -m`, health from `-t health`")
        chips = []
        for (npu_id, chip_id), (logic, name) in listed:
            chip = NPUChip(npu_id, chip_id, logic, name, UNKNOWN, None)
            health = smi.query("health", chip).get("Health Status") or UNKNOWN
            chips.append(replace(chip, health=health))
        return chips

    chips = []
    for order, chip in enumerate(table):
        logic, m_name = mapping.get((chip.npu_id, chip.chip_id), (None, ""))
        if logic is None:
            logic = chip.logic_id if chip.logic_id is not None else order
        # The table's name unless it is a placeholder (`xxx`) and `info -m` has a real one.
        name = chip.name if ray_chip_type(chip.name) or not ray_chip_type(m_name) else m_name
        chips.append(replace(chip, logic_id=logic, name=name))
    return chips


def _fill_gaps(smi: _NpuSmi, chips: list[NPUChip]) -> list[NPUChip]:
    """Per-chip queries, only for what the table and `info -m` left unknown: the name, the HBM total."""
    filled = []
    for chip in chips:
        if ray_chip_type(chip.name) is None:
            board_name = smi.query("board", chip).get("Chip Name", "")
            if ray_chip_type(board_name):
                chip = replace(chip, name=board_name)
        if chip.hbm_mb is None:
            total = _capacity_mb(smi.query("usages", chip)) or _capacity_mb(smi.query("memory", chip))
            chip = replace(chip, hbm_mb=total)
        filled.append(chip)
    return filled


def _davinci_ids(dev_dir: str) -> list[int]:
    # Ray's glob; it also keeps davinci_manager, hisi_hdc, devmm_svm out.
    ids = (re.fullmatch(r"davinci(\d+)", p.name) for p in Path(dev_dir).glob("davinci[0-9]*"))
    return sorted(int(m.group(1)) for m in ids if m)


# --- discovery -----------------------------------------------------------------------------------------


def discover(
    npu_smi: str = "npu-smi",
    dev_dir: str = "/dev",
    env: Mapping[str, str] = os.environ,
    log: Callable[[str], None] = logger.info,
    *,
    allow_warning: bool = True,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> NodeNPUs:
    """This node's NPUs: which to register with Ray, which not and why. Never raises for a missing tool."""
    notes: list[str] = []

    def note(message: str) -> None:
        notes.append(message)
        log(message)

    dev_ids = _davinci_ids(dev_dir)
    smi: _NpuSmi | None = None
    exe = shutil.which(npu_smi)
    if exe is None:
        note(f"{npu_smi} not found; falling back to /dev/davinci*")
        chips: list[NPUChip] = []
    else:
        smi = _NpuSmi(exe, timeout)
        chips = _from_npu_smi(smi, note)

    visible_env = env.get(VISIBLE_DEVICES_ENV)
    visible, bad = parse_visible_devices(visible_env) if visible_env is not None else (None, [])
    if bad:
        note(f"{VISIBLE_DEVICES_ENV}={visible_env}: ignoring {', '.join(bad)} (not a device id)")

    if chips:
        source = "npu-smi"
        if len(dev_ids) != len(chips):
            # Trust npu-smi: it lists what the driver manages, with health and logic ids; device nodes can
            # be stale after a chip drops off the bus or a driver reload, or be bind-mounted into a container
            # apart from the chips it was given.
            note(
                f"npu-smi lists {len(chips)} NPU chips but {dev_dir} has {len(dev_ids)} davinci devices; "
                f"trusting npu-smi"
            )
    elif dev_ids:
        source = "/dev/davinci"
        # Logic ids count the visible devices in order, so /dev/davinci3 alone in a container is logic id 0.
        chips = [NPUChip(n, 0, i, "", UNCHECKED, None) for i, n in enumerate(dev_ids)]
        note(f"{len(chips)} NPUs from {dev_dir}/davinci*: count only, no chip type, memory or health")
    elif visible:
        source = VISIBLE_DEVICES_ENV
        chips = [NPUChip(i, 0, i, "", UNCHECKED, None) for i in visible]
        note(f"{len(chips)} NPUs from {VISIBLE_DEVICES_ENV}={visible_env} alone: no chip type, memory or health")
    else:
        source = "none"

    usable = {OK.lower(), UNCHECKED} | ({WARNING.lower()} if allow_warning else set())
    restrict = visible is not None and source != VISIBLE_DEVICES_ENV
    healthy: list[NPUChip] = []
    excluded: list[tuple[NPUChip, str]] = []
    kept_warnings: list[NPUChip] = []
    for chip in chips:
        if chip.health.lower() not in usable:
            reason = f"health {chip.health or UNKNOWN}"
        elif restrict and chip.logic_id not in visible:  # type: ignore[operator]
            reason = f"not in {VISIBLE_DEVICES_ENV}={visible_env}"
        else:
            healthy.append(chip)
            if chip.health.lower() == WARNING.lower():
                kept_warnings.append(chip)
            continue
        excluded.append((chip, reason))
        log(f"{chip.label()}: excluded, {reason}")
    for chip in kept_warnings:
        log(f"{chip.label()}: health Warning (a minor alarm), kept; allow_warning=False excludes it")
    if kept_warnings:
        notes.append(
            f"{len(kept_warnings)} chips report health Warning and are kept: "
            + ", ".join(c.label() for c in kept_warnings)
        )
    if restrict:
        missing = sorted(set(visible) - {c.logic_id for c in chips})
        if missing:
            note(f"{VISIBLE_DEVICES_ENV}={visible_env} names logic ids {missing} that no chip here has")

    if smi is not None and source == "npu-smi":
        healthy = _fill_gaps(smi, healthy)
    healthy.sort(key=lambda c: (c.logic_id is None, c.logic_id))

    # One known type names the node (chips whose name npu-smi withheld are the same part); two do not.
    types = sorted({ray_chip_type(c.name) for c in healthy} - {None})  # type: ignore[type-var]
    chip_type = types[0] if len(types) == 1 else None
    if len(types) > 1:
        note(f"mixed chip types {types}; registering no accelerator type")
    elif healthy and source == "npu-smi" and chip_type is None:
        note(f"chip type unknown: npu-smi names the chips {sorted({c.name for c in healthy})}")
    totals = [c.hbm_mb for c in healthy if c.hbm_mb]
    hbm_gib = round(min(totals) / 1024, 2) if totals else None
    if healthy and source == "npu-smi" and len(totals) < len(healthy):
        note(f"HBM total unknown for {len(healthy) - len(totals)} of {len(healthy)} chips")

    return NodeNPUs(healthy, excluded, chip_type, hbm_gib, source, notes)
