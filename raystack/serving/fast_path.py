"""The Ray Serve settings raystack runs with: Serve's own throughput preset, minus direct ingress.

RAY_SERVE_THROUGHPUT_OPTIMIZED=1 sends handle calls over gRPC, runs user code and the handle's router on
the replica's own event loop (no thread hop per streamed chunk) and buffers access logs. On this
2-core machine it doubled the streamed chunks/s one router replica carries and halved the TTFT Serve
adds (README, "Router overhead"; scripts/bench_router.py). Direct ingress, also part of the preset,
stays off: it binds replicas on every interface. Logs still go to stderr, where `serve run` shows them.

Serve reads these when a process imports it, so they must be in the environment of Ray's processes:
build_app sets them in the Router's and every LLMServer's runtime_env; `raystack start` and `make run`
export them before Ray starts, so the HTTP proxy runs with them too. Not in a driver that calls
handles synchronously: the preset moves the handle's router onto the caller's event loop.
"""

SERVE_FAST_PATH_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
    "RAY_SERVE_LOG_TO_STDERR": "1",
}
