"""LoRA adapters of a model: made ready on a replica's nodes, and checked against the model they adapt.

A deploy config lists a model's adapters (`adapters: [{name, source}]`); clients send an adapter's name as
`model`. An adapter is a PEFT LoRA directory (adapter_config.json beside adapter_model.safetensors), from a
local path or a hub like a model (sources.py). A replica prepares every adapter of its model when it
starts, on each node its ranks run on (replica_weights.py), and checks that it fits the model: an adapter
made for another model must not be served. vLLM does not refuse one whose module names match: vLLM 0.32's
CPU engine loaded a LoRA of a 64-wide Llama into SmolLM2 (576 wide) and answered as the bare model. So the
check reads the shapes from both safetensors headers (no tensor is loaded): each lora_A must take the
input width of the weight it adapts, each lora_B give its output width.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from raystack.engines.base import AdapterFiles
from raystack.models import sources
from raystack.models.replica_weights import prepare_on_every_node

CONFIG_FILE = "adapter_config.json"
# base_model.model.<module>.lora_A.weight (PEFT's names; lora_A.<adapter>.weight in some older savings).
_LORA_TENSOR = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")


class AdapterMismatch(ValueError):
    """The adapter was not made for this model; the message says where they differ."""


def read_config(adapter_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((adapter_dir / CONFIG_FILE).read_text())
    except (OSError, ValueError) as err:
        raise AdapterMismatch(f"{adapter_dir / CONFIG_FILE} cannot be read: {err}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterMismatch(f"it is a {config.get('peft_type')} adapter; only LoRA adapters are served")
    return config


def rank(adapter_dir: Path) -> int:
    """The largest LoRA rank of the adapter (its `r`, or a module's own in rank_pattern)."""
    config = read_config(adapter_dir)
    return max([int(config.get("r") or 8), *(int(r) for r in (config.get("rank_pattern") or {}).values())])


def safetensors_shapes(files: Iterable[Path]) -> dict[str, list[int]]:
    """Each tensor's shape, read from the files' headers (8 bytes of length, then JSON): no tensor loaded."""
    shapes: dict[str, list[int]] = {}
    for path in files:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        shapes.update({name: info["shape"] for name, info in header.items() if name != "__metadata__"})
    return shapes


def check_fits(adapter_dir: Path, model_dir: Path) -> None:
    """AdapterMismatch unless every LoRA weight of the adapter fits the model weight it adapts. A model
    without safetensors weights (nothing to read shapes from) is taken on trust."""
    read_config(adapter_dir)
    model_files = sorted(model_dir.glob("*.safetensors"))
    adapter_files = sorted(adapter_dir.glob("*.safetensors"))
    if not model_files:
        return
    if not adapter_files:
        raise AdapterMismatch(f"{adapter_dir} has no adapter_model.safetensors (save it with PEFT's "
                              f"save_pretrained, which writes safetensors)")
    weights = safetensors_shapes(model_files)
    for name, shape in safetensors_shapes(adapter_files).items():
        match = _LORA_TENSOR.match(name)
        if match is None:
            continue
        module = match["module"]
        base = weights.get(f"{module}.weight")
        if base is None:
            raise AdapterMismatch(f"it adapts {module}, which the model does not have")
        if len(base) != 2 or len(shape) != 2:
            continue  # not a linear layer's weight (a quantized or fused layout): nothing to compare
        out_width, in_width = base
        if match["part"] == "A" and shape[1] != in_width:
            raise AdapterMismatch(f"its {module} takes inputs {shape[1]} wide; the model's takes {in_width}")
        if match["part"] == "B" and shape[0] != out_width:
            raise AdapterMismatch(f"its {module} gives outputs {shape[0]} wide; the model's gives {out_width}")


@dataclass(frozen=True)
class Unservable:
    """Why a replica cannot serve an adapter: the HTTP status and message its requests get."""

    status: int
    message: str


@dataclass
class ReplicaAdapters:
    """A replica's adapters: the files of each it can serve, and why it cannot serve the others."""

    served: dict[str, AdapterFiles] = field(default_factory=dict)
    unservable: dict[str, Unservable] = field(default_factory=dict)


def prepare_adapters(model_name: str, adapters: list[dict[str, str]], model_dir: Path, cache_dir: str,
                     shared: bool, progress: Callable[[str], None]) -> ReplicaAdapters:
    """Each adapter ({name, source}) on every node of this replica, checked against the model at
    `model_dir`. One that cannot be fetched or does not fit is left out, said to its requests, while the
    replica serves the model and its other adapters."""
    ready = ReplicaAdapters()
    for adapter in adapters:
        name, source = adapter["name"], adapter["source"]
        try:
            path = prepare_on_every_node(source, cache_dir, shared, progress)
            check_fits(path, model_dir)
        except sources.ModelSourceError as err:
            ready.unservable[name] = Unservable(503, f"Adapter `{name}` could not be made ready on this replica: "
                                                     f"{err}")
        except AdapterMismatch as err:
            ready.unservable[name] = Unservable(400, f"Adapter `{name}` ({source}) was not made for model "
                                                     f"`{model_name}`: {err}. Train it on `{model_name}`'s "
                                                     f"checkpoint, or list it under the model it was made for.")
        else:
            ready.served[name] = AdapterFiles(path, rank(path))
    for name, why in ready.unservable.items():
        progress(f"adapter {name} is not served here: {why.message}")
    return ready
