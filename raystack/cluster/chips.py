"""Ascend chip names: which family and model a name means, how much HBM that model has, and the node
labels that carry them (set by `raystack start`, read by placement and by engines).

Names come from `npu-smi info` ("910B3", "910B4-1", "Ascend910" on A3), `npu-smi info -m` ("Ascend 910A"),
the SoC name Ray registers (`acl.get_soc_name()`: "Ascend910B2C", "Ascend910_9392") and deploy configs
("Ascend910B", "910B4"). The canonical SoC list is torch_npu's `socVersionMap`
(Ascend/pytorch torch_npu/csrc/core/npu/NpuVariables.cpp); families follow vllm-ascend's
`_SOC_VERSION_TO_DEVICE_TYPE` (vllm_ascend/device/hardware.py: A2 = 910B1..B4-1 incl. B2C, A3 = 910_93xx,
310P) and mind-cluster's device types (910 gen 1, 910B, 310P, 310B):

    Ascend910B    Atlas A2 (800I/800T A2, 300I A2): 910B1, 910B2, 910B2C, 910B3, 910B4, 910B4-1; A2G<n> (CH HDK)
    Ascend910_93  Atlas A3 (910C, two dies = two NPUs): 910_9391/9392/9381/9382/9372/9362/9363;
                  npu-smi's table prints every A3 chip as "Ascend910"
    Ascend910     the first 910 generation: 910A, 910ProA, 910PremiumA, 910ProB and "910B" with no digit
                  (an Atlas 800 model 3000 part of 32 GB: torch_npu code 104, vllm-ascend issue #3010)
    Ascend310P    310P1..P7 (Atlas 300I Pro/Duo, 300V), and their vNPU partitions (…vir01..08)
    Ascend310B    310B1..B4 (edge)
    Ascend950     950PR, 950DT (A5)

HBM per NPU (one chip, one die on A3), nominal GiB: 910B1/B2/B2C/B3 64, 910B4 32 (npu-smi shows /32768;
vllm-ascend issue #129), 910B4-1 64 (npu-smi /65536; HAMi-WebUI issue #47), A3 64 per die, 910 gen 1 32
(mind-cluster FaultDiag RATED_HBM_DICT). 310P, 310B and 950 vary by product: measure (npu-smi) instead.
Sizes are GB on Huawei's product pages, taken as GiB here; the driver keeps a little for itself, which the
engine's memory fraction absorbs.

What `raystack estimate` sizes for when told only a name (NOMINAL): the family's usual server, its NPUs per
node and the HBM of its usual chip, where the family has one nominal size: Atlas 800I/800T A2, 8 NPUs of
64 GiB (910B1..B3; a named model has its own size, 910B4 32); Atlas A3, 16 dies of 64 GiB; Atlas 800 of
the first 910 generation, 8 NPUs of 32 GiB; Atlas 300I Duo cards, 8 NPUs of 24 GiB (a 48 GB card is two
310P3 chips). Families are also called by vllm-ascend's device types (AscendDeviceType A2, A3, _310P:
vllm_ascend/utils.py in 0.23.0.post1) and A3's chip by its name, 910C.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

# Node labels: Ray's own accelerator type (the model, as acl names it), and raystack's family and HBM.
ACCELERATOR_LABEL = "ray.io/accelerator-type"
FAMILY_LABEL = "raystack.io/npu-family"
HBM_LABEL = "raystack.io/npu-hbm-gib"

A2, A3, GEN1, P310, B310, A5 = "Ascend910B", "Ascend910_93", "Ascend910", "Ascend310P", "Ascend310B", "Ascend950"
FAMILIES = (A2, A3, GEN1, P310, B310, A5)

# Nominal HBM per NPU by model (GiB); models absent here have no fixed size.
MODEL_HBM_GIB = {
    "Ascend910B1": 64, "Ascend910B2": 64, "Ascend910B2C": 64, "Ascend910B3": 64, "Ascend910B4": 32,
    "Ascend910B4-1": 64,
    **{f"Ascend910_93{n}": 64 for n in ("91", "92", "81", "82", "72", "62", "63")},
    **{f"Ascend910{m}": 32 for m in ("A", "ProA", "PremiumA", "ProB", "B")},
}


@dataclass(frozen=True)
class Nominal:
    """An NPU as `raystack estimate` sizes for it when told only its name (module docstring): the chip, its
    HBM per NPU, the NPUs of its usual server, and what to know when sizing for it."""

    chip: str  # the family, or the model when the name says one
    hbm_gib: float
    npus_per_node: int
    note: str = ""


# Per family with one nominal size: its usual server. The chip is the family's name, or the model that
# has the size (310P: the Duo's 310P3).
NOMINAL = {
    A2: Nominal(A2, 64, 8),
    A3: Nominal(A3, 64, 16, "Ascend910_93 (A3): 64 GiB per die; each 910C chip is two dies, two NPUs"),
    GEN1: Nominal(GEN1, 32, 8, "Ascend910 (910A): not supported by vllm-ascend (its FAQ lists A2, A3, 300I Duo); "
                               "for reference"),
    P310: Nominal("Ascend310P3", 24, 8, "Ascend310P3: 24 GiB per chip; an Atlas 300I Duo card (48 GB) is two "
                                        "chips, i.e. two NPUs (experimental in vllm-ascend)"),
}

# Other names of families (compact, upper case): vllm-ascend's device types, and A3's chip.
_FAMILY_NAMES = {"A2": A2, "A3": A3, "910C": A3}

# The sizes raystack labels nodes with (`raystack.io/npu-hbm-gib`): a measured size is rounded up to the
# next of these, so label selectors can match "at least N GiB" as `in(...)` of the sizes above N.
HBM_TIERS_GIB = (8, 16, 24, 32, 48, 64, 96, 128, 144, 192, 256)

_PLACEHOLDERS = {"", "-", "NA", "MCU"}  # doc samples print `xxx`; `Mcu` is the management MCU in `info -m`
# (pattern on the name without "Ascend", upper case) -> (family, SoC name template or None when unknown)
_PATTERNS = (
    (re.compile(r"910B([1-4])(C|-1)?"), A2, lambda m: f"Ascend910B{m[1]}{m[2] or ''}"),
    (re.compile(r"A2G\d+"), A2, None),  # the CH HDK's name for 910B parts (vllm-ascend setup.py)
    (re.compile(r"910_?93(\d\d)"), A3, lambda m: f"Ascend910_93{m[1]}"),
    (re.compile(r"910"), A3, None),  # npu-smi's table name of every A3 chip
    (re.compile(r"910(A|PROA|PREMIUMA|PROB|B)"), GEN1,
     lambda m: "Ascend910" + {"A": "A", "PROA": "ProA", "PREMIUMA": "PremiumA", "PROB": "ProB", "B": "B"}[m[1]]),
    (re.compile(r"310P(\d)(VIR\d\d)?"), P310, lambda m: f"Ascend310P{m[1]}" + (m[2].lower() if m[2] else "")),
    (re.compile(r"310B(\d)"), B310, lambda m: f"Ascend310B{m[1]}"),
    (re.compile(r"950(\w*)"), A5, lambda m: f"Ascend950{m[1]}" if m[1] else None),
)


@dataclass(frozen=True)
class Chip:
    family: str  # one of FAMILIES
    model: str | None  # the SoC name as Ray registers it (acl.get_soc_name()), when the name says it

    @property
    def hbm_gib(self) -> int | None:
        """Nominal HBM per NPU, when the model has a fixed size."""
        return MODEL_HBM_GIB.get(self.model or "")


def _compact(name: str) -> str:
    """A name as the tables match it: no white space, upper case, no "Ascend" prefix."""
    return "".join(name.split()).upper().removeprefix("ASCEND")


def parse_chip(name: str) -> Chip | None:
    """The chip a name means, or None for a placeholder (`xxx`, `-`, `Mcu`) or a name of no Ascend NPU."""
    compact = _compact(name)
    if compact in _PLACEHOLDERS or "XXX" in compact:
        return None
    for pattern, family, model in _PATTERNS:
        match = pattern.fullmatch(compact)
        if match:
            return Chip(family, model(match) if model else None)
    return None


def family_of(requested: str) -> str | None:
    """A deploy config's `accelerator.type` when it names a family ("Ascend910B", "910B", "Ascend910_93",
    "310P", "A3", "910C"); None when it names a model or nothing known. "Ascend910B" is the A2 family here, as
    deploy configs mean it (the gen-1 part of that SoC name is not something vllm-ascend or MindIE support)."""
    compact = _compact(requested)
    return next((f for f in FAMILIES if _compact(f) == compact), None) or _FAMILY_NAMES.get(compact)


def nominal(name: str) -> Nominal | None:
    """What `raystack estimate` sizes for when told `name`: a family by its usual server, a model by its own
    size on its family's server; None for a chip of no nominal size. A family is looked for first, as in
    family_of ("910B" is the A2 family); '-' may also be left out ("Ascend-910B")."""
    for candidate in dict.fromkeys((name, name.replace("-", ""))):
        family = family_of(candidate)
        if family in NOMINAL:
            return NOMINAL[family]
        chip = parse_chip(candidate)
        usual = NOMINAL.get(chip.family) if chip else None
        if usual and chip.model is None:
            return usual  # the name says the family only (A2G<n>)
        if usual and (chip.hbm_gib or chip.model == usual.chip):
            return replace(usual, chip=chip.model, hbm_gib=chip.hbm_gib or usual.hbm_gib)
    return None


def hbm_tier(measured_gib: float) -> int:
    """The node label for a measured HBM size: the smallest tier it reaches (2% slack: the driver keeps a
    little; a 910A's 31129 MiB is a 32 GiB part)."""
    return next((t for t in HBM_TIERS_GIB if measured_gib <= t * 1.02), HBM_TIERS_GIB[-1])


def tiers_at_least(gib: float) -> tuple[int, ...]:
    return tuple(t for t in HBM_TIERS_GIB if t >= gib)
