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

import logging
import os
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping

from raystack.cluster.npu_smi import (
    NPUChip,
    NpuSmi,
    NpuSmiError,
    parse_info,
    parse_info_m,
    parse_visible_devices,
)
from raystack.cluster.chips import Chip, parse_chip
from raystack.process import VISIBLE_NPUS_ENV

logger = logging.getLogger(__name__)

OK = "OK"
WARNING = "Warning"
UNCHECKED = "unchecked"  # the /dev and env sources have nothing to ask about health
UNKNOWN = "unknown"  # npu-smi was asked about health and did not answer
DEFAULT_TIMEOUT_S = 10.0


@dataclass
class NodeNPUs:
    healthy: list[NPUChip]  # the chips to register, ordered by logic id
    excluded: list[tuple[NPUChip, str]]  # detected but not registered, and why ("health Critical", ...)
    chip_type: str | None  # the healthy chips' model as Ray names it (acl's SoC name), e.g. "Ascend910B3"
    hbm_gib_per_npu: float | None  # the smallest healthy chip's, so a replica sized to it fits on any
    source: str  # "npu-smi" | "/dev/davinci" | "ASCEND_RT_VISIBLE_DEVICES" | "none"
    notes: list[str] = field(default_factory=list)  # fallbacks taken, disagreements, Warning chips kept
    family: str | None = None  # the healthy chips' family (chips.FAMILIES), e.g. "Ascend910B"

    @property
    def count(self) -> int:
        return len(self.healthy)

    def visible_devices(self) -> str:
        """ASCEND_RT_VISIBLE_DEVICES for exactly the healthy chips."""
        return ",".join(str(c.logic_id) for c in self.healthy if c.logic_id is not None)


def _capacity_mb(values: Mapping[str, str]) -> int | None:
    # HBM first: 910-class chips also report the control CPU's DDR. 310P has DDR only.
    for key in ("HBM Capacity(MB)", "DDR Capacity(MB)", "Memory Capacity(MB)"):
        value = values.get(key, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def _from_npu_smi(smi: NpuSmi, note: Callable[[str], None]) -> list[NPUChip]:
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
        name = chip.name if parse_chip(chip.name) or not parse_chip(m_name) else m_name
        chips.append(replace(chip, logic_id=logic, name=name))
    return chips


def _fill_gaps(smi: NpuSmi, chips: list[NPUChip]) -> list[NPUChip]:
    """Per-chip queries, only for what the table and `info -m` left unknown: the name, the HBM total."""
    filled = []
    for chip in chips:
        known = parse_chip(chip.name)
        if known is None or known.model is None:
            board = smi.query("board", chip)
            better = parse_chip(_board_chip_name(board))
            if better and (known is None or (better.model and not known.model)):
                chip = replace(chip, name=_board_chip_name(board))
        if chip.hbm_mb is None:
            total = _capacity_mb(smi.query("usages", chip)) or _capacity_mb(smi.query("memory", chip))
            chip = replace(chip, hbm_mb=total)
        filled.append(chip)
    return filled


def _board_chip_name(board: Mapping[str, str]) -> str:
    """The chip's name from `npu-smi info -t board -i N -c C`: "Chip Name" (910B3, 910A), or on A3, where it
    says only "Ascend910", with the "NPU Name" (9392) that completes the SoC name (vllm-ascend's setup.py
    builds Ascend910_9392 the same way)."""
    name, npu_name = board.get("Chip Name", ""), board.get("NPU Name", "")
    if npu_name and "".join(name.split()).upper() == "ASCEND910":
        return f"Ascend910_{npu_name.strip()}"
    return name


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
    smi: NpuSmi | None = None
    exe = shutil.which(npu_smi)
    if exe is None:
        note(f"{npu_smi} not found; falling back to /dev/davinci*")
        chips: list[NPUChip] = []
    else:
        smi = NpuSmi(exe, timeout)
        chips = _from_npu_smi(smi, note)

    visible_env = env.get(VISIBLE_NPUS_ENV)
    visible, bad = parse_visible_devices(visible_env) if visible_env is not None else (None, [])
    if bad:
        note(f"{VISIBLE_NPUS_ENV}={visible_env}: ignoring {', '.join(bad)} (not a device id)")

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
        source = VISIBLE_NPUS_ENV
        chips = [NPUChip(i, 0, i, "", UNCHECKED, None) for i in visible]
        note(f"{len(chips)} NPUs from {VISIBLE_NPUS_ENV}={visible_env} alone: no chip type, memory or health")
    else:
        source = "none"

    usable = {OK.lower(), UNCHECKED} | ({WARNING.lower()} if allow_warning else set())
    restrict = visible is not None and source != VISIBLE_NPUS_ENV
    healthy: list[NPUChip] = []
    excluded: list[tuple[NPUChip, str]] = []
    kept_warnings: list[NPUChip] = []
    for chip in chips:
        if chip.health.lower() not in usable:
            reason = f"health {chip.health or UNKNOWN}"
        elif restrict and chip.logic_id not in visible:  # type: ignore[operator]
            reason = f"not in {VISIBLE_NPUS_ENV}={visible_env}"
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
            note(f"{VISIBLE_NPUS_ENV}={visible_env} names logic ids {missing} that no chip here has")

    if smi is not None and source == "npu-smi":
        healthy = _fill_gaps(smi, healthy)
    healthy.sort(key=lambda c: (c.logic_id is None, c.logic_id))

    # One known model names the node (chips whose name npu-smi withheld are the same part); two do not.
    parsed = [p for p in (parse_chip(c.name) for c in healthy) if p is not None]
    families = sorted({p.family for p in parsed})
    models = sorted({p.model for p in parsed if p.model})
    family = families[0] if len(families) == 1 else None
    chip_type = models[0] if len(models) == 1 and family else None
    if len(families) > 1 or len(models) > 1:
        note(f"mixed chip types {models or families}; registering no accelerator type")
    elif healthy and source == "npu-smi" and family is None:
        note(f"chip type unknown: npu-smi names the chips {sorted({c.name for c in healthy})}")
    elif family and chip_type is None and source == "npu-smi":
        note(f"{family} chips of an unnamed model ({sorted({c.name for c in healthy})}): Ray's own detection "
             f"names the model")
    totals = [c.hbm_mb for c in healthy if c.hbm_mb]
    hbm_gib = round(min(totals) / 1024, 2) if totals else None
    if healthy and source == "npu-smi" and len(totals) < len(healthy):
        note(f"HBM total unknown for {len(healthy) - len(totals)} of {len(healthy)} chips")
    nominal = Chip(family, chip_type).hbm_gib if family else None
    if hbm_gib is None and nominal:
        hbm_gib = float(nominal)
        note(f"HBM per NPU taken from the model ({chip_type}: {nominal} GiB)")

    return NodeNPUs(healthy, excluded, chip_type, hbm_gib, source, notes, family)
