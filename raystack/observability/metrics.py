"""raystack's metrics, exported through ray.util.metrics: Ray's metrics agent serves them to Prometheus
(prefixed `ray_`) and the Ray dashboard's metrics view shows them.

Per model, backend and replica (engines report them; vLLM's come from its own engine stats):
    raystack_time_to_first_token_seconds      histogram
    raystack_time_per_output_token_seconds    histogram, per request, the first token excluded
    raystack_inter_token_latency_seconds      histogram
    raystack_e2e_request_latency_seconds      histogram
    raystack_prompt_tokens_total, raystack_generation_tokens_total      counters
    raystack_requests_running, raystack_requests_waiting                gauges (the engine's own counts)
    raystack_prefix_cache_queries_total, raystack_prefix_cache_hits_total
                                              counters: prompt tokens looked up in the engine's prefix cache,
                                              and found there (vLLM's own prefix_cache_queries / _hits; their
                                              ratio is the backend's hit rate)
Per model and error type, at the router:
    raystack_request_errors_total             counter (type: OpenAI's error type, status: HTTP status)
Per model and backend, at the router:
    raystack_streams_total                    counter, per `path`: how a stream's chunks came from its replica,
                                              `channel` (replica/chunk_channel.py) or `serve` (Serve's call, when
                                              the replica could not reach the router's inbox)
Per priority class (`class`), at the router (config/priority.py, router/fair_share.py):
    raystack_queue_depth                      gauge, per model, backend and router replica: requests waiting
                                              for a slot of a full backend
    raystack_queue_wait_seconds               histogram, per model: how long requests waited for a slot (0
                                              when one was free)
    raystack_requests_refused_total           counter, per model and reason: 429s for a busy model (shed:
                                              a sheddable class gave way; queue_full, class_queue_full,
                                              queue_timeout)
Per router replica, under kv_aware routing:
    raystack_kv_index_blocks, raystack_kv_index_bytes   gauges: the blocks the router knows its replicas' KV
                                              caches hold (from their events), and the memory that takes
Per API key name (never the key), model and priority class, at the router, when router.api_keys is on:
    raystack_key_requests_total, raystack_key_errors_total                        counters
    raystack_key_prompt_tokens_total, raystack_key_completion_tokens_total        counters (engines' usage)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from raystack.protocol import error_type

if TYPE_CHECKING:
    from raystack.router.fair_share import Band

REPLICA_TAGS = ("model", "backend", "replica")
# Seconds: from a cached prefill on a small model to a long queue on a large one.
TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160, 320, 640]
TOKEN_BUCKETS = [0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                 0.75, 1, 2.5, 5]
E2E_BUCKETS = [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 2400, 3600]
# Seconds waited for a slot: none (most requests), a decode step or two, answers ending, a long backlog.
WAIT_BUCKETS = [0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300]


class ReplicaMetrics:
    """The metrics of one engine replica; created inside the replica (Ray records them per worker)."""

    def __init__(self, model: str, backend: str, replica: str):
        from ray.util import metrics

        tags = {"model": model, "backend": backend, "replica": replica}

        def histogram(name: str, description: str, buckets: list[float]) -> metrics.Histogram:
            h = metrics.Histogram(name, description=description, boundaries=buckets, tag_keys=REPLICA_TAGS)
            h.set_default_tags(tags)
            return h

        def counter(name: str, description: str) -> metrics.Counter:
            c = metrics.Counter(name, description=description, tag_keys=REPLICA_TAGS)
            c.set_default_tags(tags)
            return c

        def gauge(name: str, description: str) -> metrics.Gauge:
            g = metrics.Gauge(name, description=description, tag_keys=REPLICA_TAGS)
            g.set_default_tags(tags)
            return g

        self.ttft = histogram("raystack_time_to_first_token_seconds", "Time to the first token.", TTFT_BUCKETS)
        self.tpot = histogram("raystack_time_per_output_token_seconds",
                              "Per request: (latency - TTFT) / (output tokens - 1).", TOKEN_BUCKETS)
        self.itl = histogram("raystack_inter_token_latency_seconds", "Time between two tokens.", TOKEN_BUCKETS)
        self.e2e = histogram("raystack_e2e_request_latency_seconds", "Request latency, end to end.", E2E_BUCKETS)
        self.prompt_tokens = counter("raystack_prompt_tokens_total", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("raystack_generation_tokens_total", "Tokens generated.")
        self.running = gauge("raystack_requests_running", "Requests the engine is generating for.")
        self.waiting = gauge("raystack_requests_waiting", "Requests the engine holds but has not scheduled.")
        self.cache_queries = counter("raystack_prefix_cache_queries_total",
                                     "Prompt tokens looked up in the engine's prefix cache.")
        self.cache_hits = counter("raystack_prefix_cache_hits_total",
                                  "Prompt tokens found in the engine's prefix cache.")

    def first_tokens(self, ttfts: Iterable[float]) -> None:
        for value in ttfts:
            self.ttft.observe(value)

    def token_gaps(self, gaps: Iterable[float]) -> None:
        for value in gaps:
            self.itl.observe(value)

    def request_finished(self, latency: float, prompt_tokens: int = 0, output_tokens: int = 0,
                         tpot: float | None = None) -> None:
        """One finished request; `tpot` is (latency - TTFT) / (output tokens - 1), given only for 2 tokens
        or more. Token counts may come separately (`tokens`) when the engine reports them elsewhere."""
        self.e2e.observe(latency)
        self.tokens(prompt_tokens, output_tokens)
        if tpot is not None:
            self.tpot.observe(tpot)

    def tokens(self, prompt_tokens: int, output_tokens: int) -> None:
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)
        if output_tokens:
            self.generation_tokens.inc(output_tokens)

    def load(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def prefix_cache(self, queries: int, hits: int) -> None:
        if queries:
            self.cache_queries.inc(queries)
        if hits:
            self.cache_hits.inc(hits)


class RouterMetrics:
    """Errors the router answered, by model, OpenAI error type and HTTP status; failed tries it resent."""

    def __init__(self) -> None:
        from ray.util import metrics

        self.errors = metrics.Counter("raystack_request_errors_total", description="Requests answered with an error.",
                                      tag_keys=("model", "type", "status"))

        self.streams = metrics.Counter(
            "raystack_streams_total", tag_keys=("model", "backend", "path"),
            description="Streamed answers, by the path their chunks took from the replica: channel or serve.")
        self.replica_failures = metrics.Counter(
            "raystack_replica_failures_total", tag_keys=("model", "backend"),
            description="Tries that failed on the replica's side before the first token (the request was resent).")
        self.kv_blocks = metrics.Gauge("raystack_kv_index_blocks", tag_keys=("router",),
                                       description="KV cache blocks the router knows its replicas hold (kv_aware).")
        self.kv_bytes = metrics.Gauge("raystack_kv_index_bytes", tag_keys=("router",),
                                      description="Memory the router's index of its replicas' KV caches takes.")

        self.queued = metrics.Gauge("raystack_queue_depth", tag_keys=("model", "backend", "class", "router"),
                                    description="Requests waiting for a slot of a full backend, per priority class.")
        self.waits = metrics.Histogram("raystack_queue_wait_seconds", boundaries=WAIT_BUCKETS,
                                       tag_keys=("model", "class"),
                                       description="Time requests waited for a backend slot, per priority class.")
        self.refusals = metrics.Counter(
            "raystack_requests_refused_total", tag_keys=("model", "class", "reason"),
            description="Requests refused with 429 because the model was busy, per priority class and reason.")
        self.router = ""  # the router replica's id, set by the Router: gauges of its replicas stay apart

        def per_key(name: str, description: str) -> metrics.Counter:
            return metrics.Counter(name, description=description, tag_keys=("key", "model", "class"))

        self.key_requests = per_key("raystack_key_requests_total", "Requests per API key name and model.")
        self.key_errors = per_key("raystack_key_errors_total", "Requests of the key answered with an error.")
        self.key_prompt_tokens = per_key("raystack_key_prompt_tokens_total", "Prompt tokens, as engines counted them.")
        self.key_completion_tokens = per_key("raystack_key_completion_tokens_total",
                                             "Completion tokens, as engines counted them.")

    def key_usage(self, key: str, model: str, priority: str, prompt_tokens: int, completion_tokens: int,
                  error: bool) -> None:
        tags = {"key": key, "model": model, "class": priority}
        self.key_requests.inc(1, tags=tags)
        if error:
            self.key_errors.inc(1, tags=tags)
        if prompt_tokens:
            self.key_prompt_tokens.inc(prompt_tokens, tags=tags)
        if completion_tokens:
            self.key_completion_tokens.inc(completion_tokens, tags=tags)

    def error(self, model: str, status: int) -> None:
        self.errors.inc(1, tags={"model": model or "-", "type": error_type(status), "status": str(status)})

    def queue_depth(self, model: str, backend: str, band: Band, queued: int) -> None:
        self.queued.set(queued, tags={"model": model, "backend": backend, "class": band.name, "router": self.router})

    def queue_wait(self, model: str, priority: str, seconds: float) -> None:
        self.waits.observe(seconds, tags={"model": model, "class": priority})

    def refused(self, model: str, priority: str, reason: str) -> None:
        self.refusals.inc(1, tags={"model": model, "class": priority, "reason": reason})

    def stream_opened(self, model: str, backend: str, path: str) -> None:
        self.streams.inc(1, tags={"model": model, "backend": backend, "path": path})

    def replica_failed(self, model: str, backend: str) -> None:
        self.replica_failures.inc(1, tags={"model": model, "backend": backend})

    def kv_index(self, router: str, blocks: int, size_bytes: int) -> None:
        self.kv_blocks.set(blocks, tags={"router": router})
        self.kv_bytes.set(size_bytes, tags={"router": router})
