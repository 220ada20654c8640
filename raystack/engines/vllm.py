"""vLLM engine: AsyncLLM in-process, answered through vLLM's own OpenAI serving layer.

We build the same objects `vllm serve` builds (its argument parser, AsyncLLM, init_app_state), so chat
templates, sampling parameters, tool parsing, usage accounting and validation behave exactly as in
vLLM's server. On Ascend, vllm-ascend registers itself as a platform plugin; nothing here changes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from raystack.config import Backend
from raystack.engines.base import EngineResult, JSONResult, RequestKind
from raystack.engines.cpu_cores import move_off_engine_cores
from raystack.observability.metrics import ReplicaMetrics

logger = logging.getLogger(__name__)

GiB = 1 << 30
# On CPU, vLLM reserves gpu_memory_utilization x *total* RAM and fails when less is free (0.92 by
# default). A fixed KV cache skips that check and keeps a small model small.
CPU_DEFAULT_KV_CACHE_BYTES = 2 * GiB


class EngineArgsError(ValueError):
    pass


def engine_arg_names() -> set[str]:
    from vllm.engine.arg_utils import AsyncEngineArgs

    return {f.name for f in dataclasses.fields(AsyncEngineArgs)}


def check_engine_args(engine_args: dict[str, Any], where: str = "engine_args") -> None:
    """Fail fast on a misspelt vLLM argument (used by `config check` and build_app)."""
    known = engine_arg_names()
    unknown = sorted(set(engine_args) - known)
    if unknown:
        import difflib

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


def stats_bridge(latest: dict[int, tuple[int, int]], metrics: ReplicaMetrics | None) -> type:
    """A vLLM stat logger: keeps each engine core's latest (running, waiting) request counts in `latest`
    (vLLM reports them after every scheduler step, including the step that drops aborted requests), and
    re-exports vLLM's per-request figures (TTFT, inter-token latency, latency, tokens) to `metrics`."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class StatsBridge(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0):
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                latest[engine_idx] = (scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs)
            if iteration_stats is None or metrics is None:
                return
            metrics.first_tokens(iteration_stats.time_to_first_tokens_iter)
            metrics.token_gaps(iteration_stats.inter_token_latencies_iter)
            for done in iteration_stats.finished_requests:
                metrics.request_finished(done.e2e_latency, done.num_prompt_tokens, done.num_generation_tokens,
                                         tpot=done.mean_time_per_output_token if done.num_generation_tokens > 1 else None)

        def log_engine_initialized(self) -> None:
            pass

    return StatsBridge


class VLLMEngine:
    def __init__(self, model_name: str, model_path: Path, backend: Backend, metrics: ReplicaMetrics | None = None):
        self.model_name = model_name
        self.metrics = metrics
        self.on_cpu = backend.device == "cpu"
        self.engine_args = build_engine_args(model_name, model_path, backend)
        self.client = None
        self.state = None
        self.scheduler_counts: dict[int, tuple[int, int]] = {}  # engine core -> (running, waiting)

    async def start(self) -> None:
        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.usage.usage_lib import UsageContext
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.v1.engine.async_llm import AsyncLLM

        check_engine_args(self.engine_args)
        # vLLM's serving layer reads its options from the CLI namespace: start from its defaults.
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", self.engine_args["model"]])
        for key, value in self.engine_args.items():
            setattr(args, key, value)
        engine_args = AsyncEngineArgs.from_cli_args(args)
        usage = UsageContext.OPENAI_API_SERVER
        vllm_config = engine_args.create_engine_config(usage_context=usage)
        if vllm_config.parallel_config.distributed_executor_backend == "ray":
            from ray.util import get_current_placement_group

            # The EngineCore subprocess loses Ray's placement-group context: hand it the replica's
            # group (one NPU bundle per rank) so the workers land on the NPUs Serve reserved.
            vllm_config.parallel_config.placement_group = get_current_placement_group()
        logger.info("starting vLLM engine for %s: %s", self.model_name, self.engine_args)
        self.client = AsyncLLM.from_vllm_config(
            vllm_config=vllm_config,
            usage_context=usage,
            enable_log_requests=engine_args.enable_log_requests,
            disable_log_stats=engine_args.disable_log_stats,
            stat_loggers=[stats_bridge(self.scheduler_counts, self.metrics)],
        )
        self.state = State()
        await init_app_state(self.client, self.state, args, await self.client.get_supported_tasks())
        if self.on_cpu:
            move_off_engine_cores()

    async def generate(self, kind: RequestKind, body: dict[str, Any]) -> EngineResult:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

        try:
            if kind == "chat":
                request = ChatCompletionRequest.model_validate(body)
                result = await self.state.openai_serving_chat.create_chat_completion(request, None)
            else:
                request = CompletionRequest.model_validate(body)
                result = await self.state.openai_serving_completion.create_completion(request, None)
        except ValidationError as err:
            first = err.errors()[0]
            param = ".".join(str(p) for p in first["loc"])
            result = create_error_response(f"Invalid value for '{param}': {first['msg']}", param=param)
        except Exception as err:  # vLLM raises its validation errors (e.g. prompt too long); map them
            result = create_error_response(err)
        if isinstance(result, ErrorResponse):
            return JSONResult(result.error.code, result.model_dump())
        if hasattr(result, "model_dump"):
            return JSONResult(200, result.model_dump())
        return result

    def stats(self) -> dict[str, int]:
        counts = list(self.scheduler_counts.values())
        return {"running": sum(c[0] for c in counts), "waiting": sum(c[1] for c in counts)}

    async def check_health(self) -> None:
        await self.client.check_health()
        if self.on_cpu:  # processes started since (a restarted router, a new proxy) float again
            move_off_engine_cores()

    async def shutdown(self) -> None:
        if self.client is not None:
            self.client.shutdown()
            self.client = None
