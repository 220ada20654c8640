"""The vLLM engine arguments a backend stands for, and their check against the installed vLLM."""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


def check_engine_args(engine_args: dict[str, Any], where: str = "engine_args") -> None:
    """Fail fast on a misspelt vLLM argument (used by `config check` and build_backend)."""
    known = engine_arg_names()
    unknown = sorted(set(engine_args) - known)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            hints.append(f"  {where}.{key}: not a vLLM engine argument" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise EngineArgsError("\n".join(hints))


def build_engine_args(model_name: str, model_path: Path, backend: Backend) -> dict[str, Any]:
    """The vLLM engine arguments a backend stands for: explicit config wins over our defaults."""
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
    args.update(backend.engine_args)
    return args
