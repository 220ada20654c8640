"""The vLLM engine arguments and serving options a backend stands for, and their check against the
installed vLLM.

`vllm serve` takes two kinds of options: engine arguments (AsyncEngineArgs: the model, parallelism,
memory, `reasoning_parser`, ...) and its OpenAI layer's (the frontend's): tool parsing, chat template,
response role, LoRA modules, ... vLLM keeps the latter in BaseFrontendArgs, apart from FrontendArgs' HTTP
server options (host, port, TLS, CORS, api_key), which raystack's router owns. A backend sets the first in
`engine_args`, the second in `serving_args`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from raystack.config import Backend

GiB = 1 << 30
# On CPU, vLLM reserves gpu_memory_utilization x *total* RAM and fails when less is free (0.92 by
# default). A fixed KV cache skips that check and keeps a small model small.
CPU_DEFAULT_KV_CACHE_BYTES = 2 * GiB


class EngineArgsError(ValueError):
    pass


def engine_arg_names() -> set[str]:
    from raystack.engines.vllm.compat import vllm_api

    return {f.name for f in dataclasses.fields(vllm_api().AsyncEngineArgs)}


def serving_arg_names() -> set[str]:
    from raystack.engines.vllm.compat import vllm_api

    return {f.name for f in dataclasses.fields(vllm_api().BaseFrontendArgs)}


def _check_names(given: Iterable[str], known: Iterable[str], what: str, where: str) -> None:
    """Each of `given` must be one of `known`: else each one's error, with the closest known name."""
    known = set(known)
    unknown = sorted(set(given) - known)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            hints.append(f"  {where}{key}: not {what}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise EngineArgsError("\n".join(hints))


def _check_parser(args: dict[str, Any], option: str, plugin_option: str, registry: str, where: str) -> None:
    """`option` names one of the parsers vLLM ships, unless `plugin_option` loads one of the user's."""
    from raystack.engines.vllm.compat import vllm_api

    if args.get(option) and not args.get(plugin_option):
        _check_names([args[option]], getattr(vllm_api(), registry), f"a {option.replace('_', ' ')} vLLM ships",
                     f"{where}.{option}: ")


def check_engine_args(engine_args: dict[str, Any], where: str = "engine_args") -> None:
    """Fail fast on a misspelt vLLM argument (used by `config check` and build_backend)."""
    _check_names(engine_args, engine_arg_names(), "a vLLM engine argument", f"{where}.")
    _check_parser(engine_args, "reasoning_parser", "reasoning_parser_plugin", "_REASONING_PARSERS_TO_REGISTER", where)


def check_serving_args(serving_args: dict[str, Any], where: str = "serving_args") -> None:
    """Fail fast on a misspelt vLLM serving option, or one of the HTTP server's, and on a combination vLLM's
    server refuses at start (validate_parsed_serve_args in its cli_args.py: auto tool choice without a
    tool parser)."""
    _check_names(serving_args, serving_arg_names(), "a vLLM serving option (vLLM's BaseFrontendArgs; the HTTP "
                 "server's own options are the router's)", f"{where}.")
    _check_parser(serving_args, "tool_call_parser", "tool_parser_plugin", "_TOOL_PARSERS_TO_REGISTER", where)
    if serving_args.get("enable_auto_tool_choice") and not serving_args.get("tool_call_parser"):
        raise EngineArgsError(f"  {where}.enable_auto_tool_choice: needs tool_call_parser too (the parser of the "
                              f"model's tool-call format, e.g. hermes for Qwen models)")


# The max_lora_rank values vLLM takes (MaxLoRARanks in vllm/config/lora.py, 0.23 and 0.32 alike).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


SCHEDULING_POLICY = "priority"  # unless a backend's engine_args choose another (build_engine_args says why)


def lora_args(adapter_ranks: list[int], backend: Backend) -> dict[str, Any]:
    """LoRA on, sized for the adapters a replica serves: the smallest max_lora_rank vLLM takes that holds
    the largest rank, and as many adapters per batch and in CPU memory as the replica holds loaded."""
    if not adapter_ranks:
        return {}
    largest = max(adapter_ranks)
    return {"enable_lora": True, "max_lora_rank": next((r for r in LORA_RANKS if r >= largest), largest),
            "max_loras": backend.adapters_per_replica, "max_cpu_loras": backend.adapters_per_replica}


def build_engine_args(model_name: str, model_path: Path, backend: Backend,
                      adapter_ranks: list[int] | None = None, kv_events: dict[str, Any] | None = None) -> dict[str, Any]:
    """The vLLM engine arguments a backend stands for (with LoRA sized for adapters of `adapter_ranks`, and
    publishing KV cache events as `kv_events`, a kv_events_config, says): explicit config wins over our
    defaults (kv_aware's rules refuse a kv_events_config of the user's beside ours)."""
    args: dict[str, Any] = {
        "model": str(model_path),
        "served_model_name": [model_name],
        "tensor_parallel_size": backend.parallel.tensor,
        "pipeline_parallel_size": backend.parallel.pipeline,
    }
    if backend.max_model_len:
        args["max_model_len"] = backend.max_model_len
    if backend.device == "cpu":
        args["enforce_eager"] = True  # torch.compile takes ~4x longer to start on CPU for no gain here
        if not os.environ.get("VLLM_CPU_KVCACHE_SPACE") and not {
            "kv_cache_memory_bytes", "gpu_memory_utilization"
        } & set(backend.engine_args):
            args["kv_cache_memory_bytes"] = CPU_DEFAULT_KV_CACHE_BYTES
    elif backend.parallel.world_size > 1:
        args["distributed_executor_backend"] = "ray"
    # Requests carry their priority class (router/priority.py): vLLM's waiting queue is then a heap on
    # (priority, arrival), lower first, and when KV blocks run out it preempts the running request of the
    # highest value, latest arrival (v1/core/sched/scheduler.py, 0.23.0 and 0.32.0); under its default, fcfs, it
    # ignores `priority`. Engine arguments may choose fcfs again (the router then drops the field).
    args["scheduling_policy"] = SCHEDULING_POLICY
    args.update(lora_args(adapter_ranks or [], backend))
    if kv_events:
        args["kv_events_config"] = kv_events
    args.update(backend.engine_args)
    return args


def build_serving_args(backend: Backend, kv_events: bool = False) -> dict[str, Any]:
    """vLLM's serving options a backend stands for. Publishing KV cache events (kv_aware), its answers report
    the prompt tokens the prefix cache held (usage.prompt_tokens_details.cached_tokens), which vLLM's serving
    layer adds only with enable_prompt_tokens_details (BaseFrontendArgs, 0.23.0 and 0.32.0 alike: off by
    default); explicit config wins."""
    return {**({"enable_prompt_tokens_details": True} if kv_events else {}), **backend.serving_args}
