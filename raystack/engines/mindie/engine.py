"""MindIE engine: a supervised mindieservice_daemon per replica, proxied over loopback HTTP.

The replica writes the daemon's config.json (config.py), starts it on the NPUs Ray granted
(daemon.py), and forwards OpenAI requests to it through one pooled aiohttp session. A client that
goes away closes the upstream connection, which makes MindIE drop the request. Latencies are measured
here, on the stream the client gets; token counts and queue lengths come from MindIE's own Prometheus
/metrics, scraped at each health check and re-exported under raystack's names.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator

import aiohttp

from raystack.engines.base import AdapterFiles, Answer, RequestKind
from raystack.engines.mindie import ENGINE
from raystack.engines.mindie.config import LOOPBACK, MindIEPlan, mindie_timeouts
from raystack.engines.mindie.daemon import MindIEDaemon, MindIEStartError
from raystack.engines.supervised import free_ports
from raystack.json_codec import decode
from raystack.protocol import SSE_DONE, error_body, name_reasoning_both_ways, sse_event

if TYPE_CHECKING:
    from raystack.config import Backend
    from raystack.observability.metrics import ReplicaMetrics

logger = logging.getLogger("ray.serve")

MINDIE_DEFAULT_SEQ_LEN = 2560  # MindIE's shipped maxSeqLen, when neither the config nor the model says
HEALTH_TIMEOUT_S = 5
DRAIN_S = 10  # Serve has drained the replica before shutdown: what is left should finish quickly
KILL_GRACE_S = 10
PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


class MindIEUnavailable(RuntimeError):
    """The daemon did not take the request (not reachable, or the stream broke): the router retries
    another replica before the first token, or ends the stream with an error event after it."""


def replica_npu_ids() -> list[int]:
    """The physical ids of the NPUs Ray granted this replica (Ray's view, not ASCEND_RT_VISIBLE_DEVICES')."""
    import ray

    ids = ray.get_runtime_context().get_accelerator_ids().get("NPU", [])
    if not ids:
        raise MindIEStartError("this replica holds no NPU: engine: mindie needs device: npu and NPUs registered "
                               "with Ray (raystack start)")
    return sorted(int(i) for i in ids)


def context_length(backend: Backend, model_path: Path) -> int:
    if backend.max_model_len:
        return backend.max_model_len
    try:
        config = json.loads((model_path / "config.json").read_text())
        return int(config["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return MINDIE_DEFAULT_SEQ_LEN


def plan_for(model_name: str, model_path: Path, backend: Backend, npu_ids: list[int],
             ip: str = LOOPBACK, ports: tuple[int, int, int, int] | None = None,
             adapters: dict[str, AdapterFiles] | None = None) -> MindIEPlan:
    """What one replica runs: on `ip` (the node's IP on a replica over several nodes), its inference,
    multi-node, master and (multi-node) management `ports`, free ones unless given; its LoRA `adapters`."""
    settings = backend.mindie
    seq_len = context_length(backend, model_path)
    max_input = settings.max_input_token_len or seq_len
    multi_node = backend.parallel.pipeline > 1
    port, infer_port, master_port, management_port = ports or free_ports(4)
    token_timeout, e2e_timeout = mindie_timeouts(backend.longest_answer_s)
    return MindIEPlan(
        model_name=model_name, weight_path=str(model_path), npu_ids=npu_ids, port=port,
        max_seq_len=seq_len, max_input_token_len=max_input, max_batch_size=settings.max_batch_size,
        max_prefill_tokens=settings.max_prefill_tokens or max(8192, max_input),
        max_iter_times=seq_len,  # answers may be as long as the context allows, as on vLLM (config.py)
        multi_nodes_infer_port=infer_port, cache_block_size=settings.cache_block_size, ip=ip,
        token_timeout=token_timeout, e2e_timeout=e2e_timeout,
        multi_node=multi_node, master_port=master_port if multi_node else 0,
        management_port=management_port if multi_node else 0,  # config.py: why only there
        adapters=tuple((name, str(a.path), a.rank) for name, a in (adapters or {}).items()),
    )


# MindIE's statuses as OpenAI's: 422 is its "Input Validation Error" (OpenAI: 400), 424 its "Generation
# Error" (a failure on the server's side); 413, 500 and 503 mean the same in both.
OPENAI_STATUS = {422: 400, 424: 500}


def openai_error(status: int, payload: Any) -> tuple[int, dict[str, Any]]:
    """MindIE's error answer ({"error": "...", "error_type": "..."}, or {"message": ...}, or text) as an
    OpenAI error response, keeping MindIE's words."""
    message = None
    if isinstance(payload, dict):
        message = payload.get("error") or payload.get("message")
        if isinstance(message, dict):
            message = message.get("message")
    elif isinstance(payload, str):
        message = payload.strip()
    status = OPENAI_STATUS.get(status, status)
    return status, error_body(status, f"MindIE: {message or f'HTTP {status} without a message'}")


def scrape(text: str) -> dict[str, float]:
    """Sum each sample name of a Prometheus text page over its labels."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


class MindIEEngine:
    def __init__(self, model_name: str, model_path: Path, backend: Backend, metrics: ReplicaMetrics | None = None,
                 adapters: dict[str, AdapterFiles] | None = None):
        """`adapters`: LoRA adapters, each in the daemon's config (LoraModules) from its start."""
        self.model_name = model_name
        self.adapters = adapters or {}
        self.model_path = model_path
        self.backend = backend
        self.metrics = metrics
        self.session: aiohttp.ClientSession | None = None
        self.daemon: MindIEDaemon | None = None
        self.nodes: list[Any] = []  # MindIENode actors, when the replica spans nodes
        self.load = {"running": 0, "waiting": 0}
        self.token_totals = {"prompt_tokens_total": 0.0, "generation_tokens_total": 0.0}

    async def start(self) -> None:
        # One connection per request in flight: the pool never makes a request wait for a socket.
        connector = aiohttp.TCPConnector(limit=self.backend.max_ongoing_requests + 4)
        self.session = aiohttp.ClientSession(connector=connector,
                                             timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
        try:
            if self.backend.parallel.pipeline == 1:
                plan = plan_for(self.model_name, self.model_path, self.backend, replica_npu_ids(),
                                adapters=self.adapters)
                self.daemon = MindIEDaemon(plan, self.backend.mindie, "mindieservice_daemon", self.backend.env)
                await self.daemon.start(self.session, KILL_GRACE_S)
            else:
                await self._start_on_nodes()
        except BaseException:
            await self.shutdown()
            raise

    async def _start_on_nodes(self) -> None:
        """One daemon per node of the replica's placement group, all from one rank table; this replica's
        node comes first, so it holds rank 0: MindIE's master, which alone takes requests."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from raystack.engines.mindie.node import MindIENode, this_node
        from raystack.engines.mindie.ranktable import render_ranktable

        group = ray.util.get_current_placement_group()
        placement = ENGINE.placement(self.backend)
        node_actor = ray.remote(MindIENode)
        for index in placement.node_bundles:
            bundle = placement.bundles[index]
            self.nodes.append(node_actor.options(
                num_cpus=bundle.get("CPU", 0), resources={"NPU": bundle["NPU"]},
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index),
            ).remote(self.backend.mindie.model_dump(), self.backend.env, f"mindieservice_daemon (node {index})"))
        me = await asyncio.to_thread(this_node)
        others = await asyncio.gather(*(node.where.remote() for node in self.nodes))
        table = render_ranktable([me, *others])
        plan = plan_for(self.model_name, self.model_path, self.backend, [i for i, _ in me.devices], ip=me.ip,
                        adapters=self.adapters)
        self.daemon = MindIEDaemon(plan, self.backend.mindie, "mindieservice_daemon (node 0, master)",
                                   self.backend.env, ranktable=table)
        logger.info("MindIE over %d nodes, rank table: %s", len(table["server_list"]), table)
        await asyncio.gather(self.daemon.start(self.session, KILL_GRACE_S),
                             *(node.start.remote(plan, table, KILL_GRACE_S) for node in self.nodes))

    async def load_adapter(self, name: str) -> None:
        """Nothing to do: the daemon loaded every adapter at its start (LoraModules)."""

    async def generate(self, kind: RequestKind, body: dict[str, Any]) -> Answer:
        # MindIE serves the model under this name, and an adapter under its own (AssignLoraId in MindIE-LLM's
        # infer_param.cpp: `model` other than the base's selects that LoRA). It reads no stream_options: it
        # always sends usage, on the finishing chunk; include_usage is honoured here (_relay).
        model = body.get("model") if body.get("model") in self.adapters else self.model_name
        payload = {k: v for k, v in body.items() if k != "stream_options"} | {"model": model}
        started = time.monotonic()
        try:
            response = await self.session.post(self.daemon.url + PATHS[kind], json=payload)
        except aiohttp.ClientError as err:
            raise MindIEUnavailable(f"MindIE did not take the request: {err!r}; {self._gone()}") from None
        if response.status != 200 or not body.get("stream"):
            async with response:
                try:
                    answer = await response.json(content_type=None, loads=decode)
                except (json.JSONDecodeError, aiohttp.ClientError):
                    answer = await response.text()
            if response.status != 200:
                return Answer.whole(*openai_error(response.status, answer))
            self._finished(time.monotonic() - started, None, [], answer.get("usage") if isinstance(answer, dict) else None)
            if isinstance(answer, dict):
                name_reasoning_both_ways(answer)
            return Answer.whole(200, answer)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return Answer.streamed(self._relay(response, started, include_usage))

    async def _relay(self, response: aiohttp.ClientResponse, started: float, include_usage: bool) -> AsyncIterator[str]:
        first_at: float | None = None
        last_at = started
        gaps: list[float] = []
        usage = None
        last_chunk: dict[str, Any] = {}  # id, object, created, model: for the usage chunk
        done = False
        engine_error = ""
        try:
            async for raw in response.content:
                line = raw.strip()
                if not line:
                    continue
                if not line.startswith(b"data:"):
                    # MindIE reports a failure mid-stream (an engine timeout) as plain text, then closes.
                    engine_error += line.decode(errors="replace")
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    if include_usage and usage is not None:  # OpenAI's shape: a last chunk of usage only
                        yield sse_event({**last_chunk, "choices": [], "usage": usage})
                    yield SSE_DONE
                    break
                chunk = decode(data)
                now = time.monotonic()
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if chunk.get("choices"):
                    if first_at is None:
                        first_at = now
                    else:
                        gaps.append(now - last_at)
                    last_at = now
                last_chunk = {k: v for k, v in chunk.items() if k not in ("choices", "usage")}
                yield sse_event(chunk) if name_reasoning_both_ways(chunk) else f"data: {data.decode()}\n\n"
        except (aiohttp.ClientError, json.JSONDecodeError) as err:
            raise MindIEUnavailable(f"MindIE's stream broke: {err!r}; {self._gone()}") from None
        finally:
            response.close()  # a client that left closes the upstream connection: MindIE drops the request
        if not done:
            if engine_error and not self.daemon.exited():
                yield sse_event(error_body(500, f"MindIE: {engine_error}; the answer is incomplete. Retry the request."))
                yield SSE_DONE
                return
            raise MindIEUnavailable(f"MindIE closed the stream before [DONE]; {self._gone()}")
        self._finished(time.monotonic() - started, first_at and first_at - started, gaps, usage)

    def _finished(self, latency: float, ttft: float | None, gaps: list[float], usage: dict | None) -> None:
        if self.metrics is None:
            return
        if ttft is not None:
            self.metrics.first_tokens([ttft])
            self.metrics.token_gaps(gaps)
        tokens = (usage or {}).get("completion_tokens") or (len(gaps) + 1 if ttft is not None else 0)
        tpot = (latency - ttft) / (tokens - 1) if ttft is not None and tokens > 1 else None
        # Token counts reach the counters from MindIE's /metrics (scrape_metrics), not from here.
        self.metrics.request_finished(latency, tpot=tpot)

    def _gone(self) -> str:
        return self.daemon.exited() or "the daemon still runs"

    def stats(self) -> dict[str, int]:
        return dict(self.load)

    async def check_health(self) -> None:
        why = self.daemon.exited()
        for node in self.nodes:  # a dead node actor raises here, as a dead daemon does
            why = why or await node.exited.remote()
        if why:
            raise RuntimeError(why)
        if not await self.daemon.healthy(self.session, HEALTH_TIMEOUT_S):
            raise RuntimeError(f"mindieservice_daemon's /health did not answer 200 within {HEALTH_TIMEOUT_S} s")
        await self.scrape_metrics()

    async def scrape_metrics(self) -> None:
        """MindIE's /metrics (MIES_SERVICE_MONITOR_MODE=1) re-exported: running/waiting and token counts."""
        try:
            async with self.session.get(f"{self.daemon.plan.management_url}/metrics",
                                        timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)) as r:
                if r.status != 200:
                    return
                values = scrape(await r.text())
        except (aiohttp.ClientError, TimeoutError, ValueError) as err:
            logger.warning("could not read MindIE's /metrics: %r", err)
            return
        self.load = {"running": int(values.get("num_requests_running", 0)),
                     "waiting": int(values.get("num_requests_waiting", 0))}
        deltas = {}
        for name, before in self.token_totals.items():
            now = values.get(name, before)
            deltas[name] = now - before if now >= before else now  # a counter that went back started over
            self.token_totals[name] = now
        if self.metrics is not None:
            self.metrics.tokens(int(deltas["prompt_tokens_total"]), int(deltas["generation_tokens_total"]))

    async def shutdown(self) -> None:
        if self.daemon is not None:
            await self.daemon.stop(self.session, DRAIN_S, KILL_GRACE_S)
            self.daemon = None
        if self.nodes:
            import ray

            await asyncio.gather(*(node.stop.remote(KILL_GRACE_S) for node in self.nodes), return_exceptions=True)
            for node in self.nodes:
                ray.kill(node)
            self.nodes = []
        if self.session is not None:
            await self.session.close()
            self.session = None
