"""engine: vllm, vLLM's AsyncLLM in the replica (vllm-ascend's platform plugin on NPUs, the CPU engine on
`device: cpu`), answered through vLLM's own OpenAI serving layer.

    args.py       the engine arguments a backend stands for, and their check
    engine.py     VLLMEngine: AsyncLLM + vLLM's OpenAI serving layer, its stats bridged to raystack's metrics
    kv_events.py  the KV cache events a replica publishes for kv_aware routing, and the hash seed they need
    cpu_cores.py  keep Ray's processes off the CPU engine's cores
    installed.py  whether this node runs vLLM on its NPUs (vllm-ascend), and which (raystack start's node label)

Importing this package loads no vLLM: only the spec below.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from raystack.engines.base import EngineSpec, Found, NodeSoftware, PlannedNode, Refusal, RequestKind, Where
from raystack.engines.vllm.compat import SUPPORTED
from raystack.engines.vllm.kv_events import rules as kv_events_rules
from raystack.protocol import tool_choice_of

if TYPE_CHECKING:
    from raystack.config import Backend

# The share of each NPU's HBM a vLLM backend is sized within when its engine_args do not set
# gpu_memory_utilization (`raystack estimate`, parallelism: auto, the HBM a replica needs). vLLM's own default,
# EngineArgs.gpu_memory_utilization = CacheConfig.gpu_memory_utilization (vllm/config/cache.py), is 0.92 in both
# vLLMs raystack runs (0.23.0 and 0.32.0); sizing at 0.9 keeps two points of HBM in hand.
GPU_MEMORY_UTILIZATION = 0.9


def _validate(backend: Backend) -> None:
    if backend.device == "cpu" and backend.parallel.world_size > 1:
        raise ValueError(
            "parallelism above 1 needs device: npu (vLLM's CPU platform has no Ray executor); "
            "set parallelism to {tensor: 1, pipeline: 1} or device: npu"
        )


def _check_deployable(backend: Backend, where: str) -> list[str]:
    """The vLLM installed where the config is checked: a version raystack runs on, and engine arguments it
    knows. Where no vLLM is installed (a router-only head), the replica checks both when it starts."""
    from raystack.engines.vllm.args import EngineArgsError, check_engine_args, check_serving_args
    from raystack.engines.vllm.compat import UnsupportedVLLM, installed_version, require_supported

    found = installed_version()
    if found is None:
        return []
    try:
        require_supported(found)
        check_engine_args(backend.engine_args, f"{where}.engine_args")
        check_serving_args(backend.serving_args, f"{where}.serving_args")
    except UnsupportedVLLM as err:
        return [f"  {where}: {err}"]
    except EngineArgsError as err:
        return [str(err)]
    return []


def _refuses(kind: RequestKind, body: dict[str, Any], backend: Backend) -> Refusal | None:
    """vLLM answers tools through a tool parser only, and makes one only with enable_auto_tool_choice: for
    `auto` (0.23 and 0.32), and in 0.32 for a named or `required` tool_choice too (its serving layer then
    constrains the call with the parser's structural tag: tool_parsers/abstract_tool_parser.py,
    parser/parser_manager.py get_tool_parser). Structured output needs nothing: every vLLM has a backend."""
    if tool_choice_of(body) not in (None, "none") and not backend.serving_args.get("enable_auto_tool_choice"):
        return Refusal("tools", "it has no tool parser; set its serving_args enable_auto_tool_choice: true and "
                                "tool_call_parser (vLLM's parser for the model's tool-call format, hermes for Qwen)")
    return None


def _schedules_by_priority(backend: Backend) -> bool:
    """build_engine_args sets scheduling_policy: priority unless engine_args choose another."""
    from raystack.engines.vllm.args import SCHEDULING_POLICY

    return backend.engine_args.get("scheduling_policy", SCHEDULING_POLICY) == "priority"


def _running_limit(backend: Backend) -> int | None:
    """vLLM's scheduler runs at most max_num_seqs requests and starts no waiting one, however urgent, while
    that many run (Scheduler.schedule, 0.23.0 and 0.32.0). Its default varies with device and vLLM version:
    unset, the router counts max_ongoing_requests alone."""
    return backend.engine_args.get("max_num_seqs")


def _plan(model_name: str, model_path: Path, backend: Backend, nodes: list[PlannedNode]) -> dict[str, Any]:
    from raystack.engines.vllm.args import build_engine_args

    ranks = ("one process in the replica (uniproc executor), on the replica's NPU" if backend.parallel.world_size == 1
             else "Ray workers, one per NPU bundle; vLLM sets each worker's ASCEND_RT_VISIBLE_DEVICES to the "
                  "bundle NPUs Ray granted on its node (RayExecutorV2)")
    return {"engine_args": build_engine_args(model_name, model_path, backend),
            "serving_args": backend.serving_args, "ranks": ranks,
            "vllm_versions": ", ".join(f"{s}.x" for s in SUPPORTED)}


def _detect(where: Where) -> Found:
    from raystack.engines.vllm.installed import detect

    return detect(where)


# NPU replicas need vllm-ascend: nodes with it carry the series of their vLLM, one compat.py knows.
NODE_SOFTWARE = NodeSoftware(
    label="raystack.io/engine-vllm",
    series=tuple(SUPPORTED),
    planned="0.23",
    name="vLLM-Ascend",
    install="start a node with `raystack start` in vllm-ascend's image (quay.io/ascend/vllm-ascend), or where "
            "vllm-ascend is installed as its guide says (README, \"On an Ascend NPU cluster\")",
    detect=_detect,
)

ENGINE = EngineSpec(
    name="vllm",
    engine_class="raystack.engines.vllm.engine:VLLMEngine",
    devices=("npu", "cpu"),
    takes_engine_args=True,
    serves_adapters=True,
    publishes_kv_events=True,
    kv_events_rules=kv_events_rules,
    validate=_validate,
    check_deployable=_check_deployable,
    refuses=_refuses,
    schedules_by_priority=_schedules_by_priority,
    running_limit=_running_limit,
    memory_fraction=lambda backend: float(backend.engine_args.get("gpu_memory_utilization", GPU_MEMORY_UTILIZATION)),
    plan=_plan,
    node_software=NODE_SOFTWARE,
)
