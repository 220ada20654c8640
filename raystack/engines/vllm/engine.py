"""vLLM engine: AsyncLLM in-process, answered through vLLM's own OpenAI serving layer.

We build the same objects `vllm serve` builds (its argument parser, AsyncLLM, init_app_state), so chat
templates, sampling parameters, tool parsing, usage accounting and validation behave exactly as in
vLLM's server. On Ascend, vllm-ascend registers itself as a platform plugin; nothing here changes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from raystack.engines.ascend_env import require_cann_environment
from raystack.engines.base import AdapterFiles, AdapterLoadError, Answer, RequestKind
from raystack.engines.supervised import guard_children
from raystack.engines.vllm.args import build_engine_args, build_serving_args, check_engine_args, check_serving_args
from raystack.engines.vllm.compat import VLLMAPI, vllm_api
from raystack.engines.vllm.cpu_cores import move_off_engine_cores
from raystack.engines.vllm.kv_events import Publisher, seed_the_engine
from raystack.protocol import name_reasoning_both_ways, stream_reasoning_both_ways

if TYPE_CHECKING:
    from raystack.config import Backend
    from raystack.observability.metrics import ReplicaMetrics

logger = logging.getLogger(__name__)


def stats_bridge(vllm: VLLMAPI, latest: dict[int, tuple[int, int]], metrics: ReplicaMetrics | None) -> type:
    """A vLLM stat logger: keeps each engine core's latest (running, waiting) request counts in `latest`
    (vLLM reports them after every scheduler step, including the step that drops aborted requests), and
    re-exports vLLM's per-request figures (TTFT, inter-token latency, latency, tokens) and its prefix cache
    lookups to `metrics`."""
    class StatsBridge(vllm.StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0):
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                latest[engine_idx] = (scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs)
                if metrics is not None:  # this step's lookups (vLLM's PrometheusStatLogger counts the same)
                    cache = scheduler_stats.prefix_cache_stats
                    metrics.prefix_cache(cache.queries, cache.hits)
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


def serve_namespace(vllm: VLLMAPI, engine_args: dict[str, Any], serving_args: dict[str, Any]) -> Any:
    """The options `vllm serve` would hold for these engine arguments and serving options: vLLM's serving
    layer (init_app_state) reads them from its CLI namespace, so start from its parser's defaults."""
    given = {**engine_args, **serving_args}
    # A mapping (structured_outputs_config, compilation_config, hf_overrides, ...) goes in as `vllm serve` takes
    # it, JSON its parser turns into vLLM's config object: set as a dict, the engine fails on it at start.
    mappings = [part for key, value in given.items() if isinstance(value, dict)
                for part in (f"--{key.replace('_', '-')}", json.dumps(value))]
    args = vllm.make_arg_parser(vllm.FlexibleArgumentParser()).parse_args(["--model", engine_args["model"], *mappings])
    for key, value in given.items():
        if not isinstance(value, dict):
            setattr(args, key, value)
    return args


class VLLMEngine:
    def __init__(self, model_name: str, model_path: Path, backend: Backend, metrics: ReplicaMetrics | None = None,
                 adapters: dict[str, AdapterFiles] | None = None, kv_events_topic: str | None = None):
        """`kv_events_topic`: publish the KV cache events (routing: kv_aware) under this topic."""
        self.model_name = model_name
        self.metrics = metrics
        self.on_cpu = backend.device == "cpu"
        self.adapters = adapters or {}  # loaded into the engine when a replica first holds one (load_adapter)
        self.publisher = Publisher.on_free_ports(kv_events_topic) if kv_events_topic else None
        self.engine_args = build_engine_args(model_name, model_path, backend,
                                             [adapter.rank for adapter in self.adapters.values()],
                                             self.publisher.engine_config() if self.publisher else None)
        self.serving_args = build_serving_args(backend, kv_events=self.publisher is not None)
        self.kv_address: dict[str, Any] | None = None  # where the engine publishes, once started (kv_events)
        self.thinks = bool(backend.engine_args.get("reasoning_parser"))  # answers carry reasoning text
        self.vllm = vllm_api()  # the installed vLLM's names; an unsupported vLLM stops the replica here
        self.client = None
        self.guard = None  # over EngineCore and its workers: engines/supervised.py
        self.state = None
        self.scheduler_counts: dict[int, tuple[int, int]] = {}  # engine core -> (running, waiting)

    async def start(self) -> None:
        from starlette.datastructures import State

        if not self.on_cpu:  # on NPUs, before vLLM and torch_npu load: without CANN's environment they fail deep inside
            require_cann_environment()
        vllm = self.vllm
        check_engine_args(self.engine_args)
        check_serving_args(self.serving_args)
        args = serve_namespace(vllm, self.engine_args, self.serving_args)
        engine_args = vllm.AsyncEngineArgs.from_cli_args(args)
        usage = vllm.UsageContext.OPENAI_API_SERVER
        vllm_config = engine_args.create_engine_config(usage_context=usage)
        if vllm_config.parallel_config.distributed_executor_backend == "ray":
            from ray.util import get_current_placement_group

            # The EngineCore subprocess loses Ray's placement-group context: hand it the replica's
            # group (one NPU bundle per rank) so the workers land on the NPUs Serve reserved.
            vllm_config.parallel_config.placement_group = get_current_placement_group()
        # The seed of the engine's block hashes, in the environment its EngineCore process starts with.
        seed = seed_the_engine(vllm_config.cache_config.prefix_caching_hash_algo) if self.publisher else None
        logger.info("starting vLLM engine for %s: %s", self.model_name, self.engine_args)
        self.client = vllm.AsyncLLM.from_vllm_config(
            vllm_config=vllm_config,
            usage_context=usage,
            enable_log_requests=engine_args.enable_log_requests,
            disable_log_stats=engine_args.disable_log_stats,
            stat_loggers=[stats_bridge(vllm, self.scheduler_counts, self.metrics)],
        )
        # EngineCore (and its workers) must not outlive this replica, even when the Ray node goes first.
        self.guard = await asyncio.to_thread(guard_children)
        self.state = State()
        await vllm.init_app_state(self.client, self.state, args, await self.client.get_supported_tasks())
        if self.publisher is not None:
            self.kv_address = self._kv_address(seed)
        if self.on_cpu:
            move_off_engine_cores()

    def _kv_address(self, seed: str | None) -> dict[str, Any] | None:
        """Once the engine runs: where it publishes its KV cache events, with the block size and hashing it
        settled on. The block size is final only now: the engine core may change it for its attention
        backend (Platform.update_block_size_for_backend, in the executor) and sends it back when ready, into
        the client's vllm_config (v1/engine/core_client.py, "Sync block_size", 0.23.0 and 0.32.0); the CPU
        platform makes it 128 (CpuPlatform.check_and_update_config). None if vLLM keeps the prefix cache off
        for this model: no blocks to tell of."""
        import ray

        cache = self.client.vllm_config.cache_config
        if not cache.enable_prefix_caching:
            logger.warning("vLLM keeps the prefix cache off for %s: no KV cache events, routers route this "
                           "replica least_loaded", self.model_name)
            return None
        return self.publisher.address(ray.util.get_node_ip_address(), cache.block_size,
                                      cache.prefix_caching_hash_algo, seed, self.vllm.series)

    def kv_events(self) -> dict[str, Any] | None:
        return self.kv_address

    async def generate(self, kind: RequestKind, body: dict[str, Any]) -> Answer:
        vllm = self.vllm
        create_error_response = vllm.create_error_response
        try:
            if kind == "chat":
                request = vllm.ChatCompletionRequest.model_validate(body)
                result = await self.state.openai_serving_chat.create_chat_completion(request, None)
            else:
                request = vllm.CompletionRequest.model_validate(body)
                result = await self.state.openai_serving_completion.create_completion(request, None)
        except ValidationError as err:
            first = err.errors()[0]
            param = ".".join(str(p) for p in first["loc"])
            result = create_error_response(f"Invalid value for '{param}': {first['msg']}", param=param)
        except Exception as err:  # vLLM raises its validation errors (e.g. prompt too long); map them
            result = create_error_response(err)
        if isinstance(result, vllm.ErrorResponse):
            return Answer.whole(result.error.code, result.model_dump())
        if hasattr(result, "model_dump"):
            answer = result.model_dump()
            if self.thinks:
                name_reasoning_both_ways(answer)
            return Answer.whole(200, answer)
        return Answer.streamed(stream_reasoning_both_ways(result) if self.thinks else result)

    async def load_adapter(self, name: str) -> None:
        """As vLLM's /v1/load_lora_adapter does: the adapter checked and loaded into the engine, and served
        under `name` from then on. Loaded before (and since forgotten by Serve's multiplexing), it still is:
        vLLM's serving layer refuses to load a name twice (models/serving.py, 0.23 and 0.32)."""
        models = self.state.openai_serving_models
        if name in models.lora_requests:
            return
        request = self.vllm.LoadLoRAAdapterRequest(lora_name=name, lora_path=str(self.adapters[name].path))
        result = await models.load_lora_adapter(request)
        if isinstance(result, self.vllm.ErrorResponse):
            raise AdapterLoadError(result.error.message)

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
        if self.guard is not None:
            self.guard.stdin.close()  # the guard wakes and stops whatever of the engine is still there
            self.guard = None
