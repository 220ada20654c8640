"""Router: the ingress deployment. Checks requests, picks a backend by the model's routing policy,
forwards, and keeps every request bounded.

    POST /v1/chat/completions, /v1/completions   OpenAI API, streaming (SSE) or not
    GET  /v1/models                              the configured models
    GET  /health                                 200 once every model can answer

`model` may name a backend explicitly as `model@backend` (benchmarks compare backends that way).
Each answer names who served it in the headers x-raystack-backend and x-raystack-replica.

Failures: a replica that fails before the first token -> the request goes to another replica (up to
`router.retries` times); after the first token -> the stream ends with an OpenAI-style error event.
Every replica busy and the backend's queue full -> 429 with Retry-After. No first token within
`first_token_timeout_s` -> 503 (no replica came up) or 504; past `request_timeout_s` -> the stream ends
with an error event. A body over `max_request_bytes` -> 413; one that stalls past `body_timeout_s` -> 408.
Nothing waits unbounded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.exceptions import HTTPException as StarletteHTTPException

from raystack.config import Model, RaystackConfig, deployment_name
from raystack.observability.metrics import RouterMetrics
from raystack.serving.priority import restore_normal_priority
from raystack.serving.protocol import (
    REQUEST_MODELS,
    SSE_DONE,
    OpenAIError,
    error_body,
    parse_request,
    sse_event,
)
from raystack.serving import routing
from raystack.serving.auth import APIKeys
from raystack.serving.routing import BackendLoad, choose_backend, prefix_blocks, prompt_text
from raystack.serving.server import Opening

logger = logging.getLogger("ray.serve")

HEALTH_PROBE_TIMEOUT_S = 2.0
# A full queue empties as requests finish (seconds for most LLM answers): ask clients to come back soon.
BUSY_RETRY_AFTER_S = 1

app = FastAPI(
    title="raystack",
    description="OpenAI-compatible API served by raystack (Ray Serve + vLLM / MindIE).",
    version="0.1.0",
)


@app.exception_handler(OpenAIError)
async def _openai_error(_: Request, err: OpenAIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(error_body(err.status_code, str(err.detail)), status_code=err.status_code)


# Bodies are parsed by hand (one pass, pass-through of engine-specific keys) but still documented in the
# OpenAPI schema: each body's schema is given to its route, the models it refers to go to the components.
SCHEMA_REF = "#/components/schemas/{model}"
BODY_COMPONENTS: dict[str, Any] = {}


def _body_schema(kind: str) -> dict[str, Any]:
    schema = REQUEST_MODELS[kind].model_json_schema(ref_template=SCHEMA_REF)
    BODY_COMPONENTS.update(schema.pop("$defs", {}))
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _openapi() -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schema.setdefault("components", {}).setdefault("schemas", {}).update(BODY_COMPONENTS)
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi


async def _result(response: Any) -> Any:
    return await response


class ReplicaFailed(Exception):
    """A replica failed before answering: the request may go to another one."""


# Module helpers precede the deployment class: Serve pickles the class (by value) when it is decorated.
def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


def _too_large(limit: int) -> OpenAIError:
    return OpenAIError(
        413, f"The request body exceeds {limit} bytes (router.max_request_bytes). Send a shorter prompt, "
        f"or raise the limit in the deploy config.", code="request_too_large",
    )


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, or a 413 as soon as it is known to exceed `limit` bytes: from Content-Length
    before reading, or while reading a body sent without one (chunked). A body still incomplete after
    `timeout_s` is a 408: a client that stalls must not hold a router slot forever."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    parts, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for part in request.stream():
                size += len(part)
                if size > limit:
                    raise _too_large(limit)
                parts.append(part)
    except TimeoutError:
        raise OpenAIError(408, f"The request body did not arrive within {timeout_s:g} s "
                               f"(router.body_timeout_s; {size} bytes came). Send the whole body at once.",
                          code="request_timeout") from None
    return b"".join(parts)


def check_length_bounds(model: Model, body: dict[str, Any]) -> None:
    """A completion length no backend of `model` has room for is a 400 here, before any engine sees it."""
    limit = model.context_limit
    for param in ("max_completion_tokens", "max_tokens"):
        requested = body.get(param)
        if limit is not None and requested is not None and requested >= limit:
            raise OpenAIError(
                400, f"This model's maximum context length is {limit} tokens, which the prompt shares; "
                f"{param} {requested} leaves it no room. Lower {param} below {limit}.",
                param=param, code="context_length_exceeded",
            )


def _last_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[-1][:300] if text else "no detail"


@serve.deployment
@serve.ingress(app)
class Router:
    # Serve ships this class by value (cloudpickle), copying the module globals it uses: state shared with
    # the request routers is reached through the `routing` module, which is imported, not copied.

    def __init__(self, config: dict[str, Any], backends: dict[str, dict[str, DeploymentHandle]]):
        restore_normal_priority()
        self.config = RaystackConfig.model_validate(config)
        self.settings = self.config.router
        self.models: dict[str, Model] = {m.name: m for m in self.config.models}
        self.streams = {
            model: {name: handle.options(stream=True) for name, handle in handles.items()}
            for model, handles in backends.items()
        }
        self.handles = backends
        self.deployments = {
            model.name: {b.name: deployment_name(model.name, b.name) for b in model.backends}
            for model in self.config.models
        }
        self.in_flight: Counter[tuple[str, str]] = Counter()  # (model, backend) -> requests not yet done
        keys = self.settings.api_keys
        self.api_keys = APIKeys.load(keys.env, keys.file) if keys else None
        self.metrics = RouterMetrics()
        self.created = int(time.time())

    def resolve(self, requested: str) -> tuple[Model, str | None]:
        """`model` or `model@backend` -> (model, pinned backend or None)."""
        name, _, pinned = requested.partition("@")
        model = self.models.get(name)
        if model is None:
            raise OpenAIError(
                404,
                f"The model `{requested}` does not exist. Available models: {', '.join(sorted(self.models))}.",
                param="model",
                code="model_not_found",
            )
        if pinned and pinned not in self.deployments[name]:
            raise OpenAIError(
                404,
                f"Model `{name}` has no backend `{pinned}`. Its backends: {', '.join(self.deployments[name])}.",
                param="model",
                code="model_not_found",
            )
        return model, pinned or None

    def choose(self, model: Model, route: tuple[int, ...], exclude: set[str]) -> str | None:
        deployments = self.deployments[model.name]
        loads = [
            BackendLoad(b.name, b.weight, self.in_flight[model.name, b.name],
                        routing.RUNNING_REPLICAS.get(deployments[b.name]))
            for b in model.backends if b.name not in exclude
        ]
        if not loads:
            return None
        affinity = None
        if route:
            owner = routing.PREFIXES.match(route)
            affinity = next((b for b, d in deployments.items() if owner and d == owner[0]), None)
        return choose_backend(model.routing.policy, loads, affinity, model.routing.affinity_slack)

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        """200 once every model can answer: a backend has a ready replica, or the model scales from zero.
        503 (and which) until then."""
        waiting = []
        for model in self.models.values():
            always_on = [b.name for b in model.backends if b.autoscaling.min_replicas > 0]
            if always_on and not await self._any_ready([self.handles[model.name][b] for b in always_on]):
                waiting.append(model.name)
        if waiting:
            raise OpenAIError(
                503,
                f"No replica is ready yet for: {', '.join(waiting)}. Models take a while to load after "
                f"start; `serve status` shows their progress.",
                headers={"Retry-After": "5"},
            )
        return {"status": "ok"}

    @staticmethod
    async def _any_ready(handles: list[DeploymentHandle]) -> bool:
        for handle in handles:
            response = handle.ready.remote()
            try:
                # A call queues while no replica has finished loading: bound the wait.
                await asyncio.wait_for(_result(response), HEALTH_PROBE_TIMEOUT_S)
                return True
            except Exception:
                response.cancel()
        return False

    def authenticate(self, request: Request) -> str | None:
        """The digest of the request's API key (None when keys are off); 401 without a valid one."""
        return self.api_keys.check(request.headers.get("authorization")) if self.api_keys else None

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> dict[str, Any]:
        key = self.authenticate(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": model.name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "raystack",
                    "root": model.source,
                    "backends": [b.name for b in model.backends],
                }
                for model in self.models.values()
                if key is None or self.api_keys.may_use(key, model.name)
            ],
        }

    @app.post("/v1/chat/completions", openapi_extra=_body_schema("chat"))
    async def chat_completions(self, request: Request):
        return await self.forward("chat", request)

    @app.post("/v1/completions", openapi_extra=_body_schema("completion"))
    async def completions(self, request: Request):
        return await self.forward("completion", request)

    async def forward(self, kind: str, request: Request):
        try:
            return await self._forward(kind, request)
        except OpenAIError as err:
            self.metrics.error(getattr(request.state, "model", "-"), err.status)
            raise

    async def _forward(self, kind: str, request: Request):
        key = self.authenticate(request)  # before anything else: no hints to a caller without a key
        raw = await read_body(request, self.settings.max_request_bytes, self.settings.body_timeout_s)
        body = parse_request(kind, raw)
        requested = body["model"]
        model, pinned = self.resolve(requested)
        request.state.model = model.name  # the errors metric's label from here on
        if key is not None:
            self.api_keys.require(key, model.name)
        check_length_bounds(model, body)
        body["model"] = model.name
        route = ()
        if model.routing.policy == "prefix_affinity":
            route = prefix_blocks(prompt_text(kind, body), model.routing.prefix_chars)
        streaming = bool(body.get("stream"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout_s
        busy: set[str] = set()  # backends whose replicas and queue are full
        failures = 0
        while True:
            backend = pinned or self.choose(model, route, exclude=busy)
            if backend is None or backend in busy:
                raise OpenAIError(
                    429,
                    f"Every replica of `{requested}` is busy and its queue is full; retry in "
                    f"{BUSY_RETRY_AFTER_S} s, or raise the backend's max_queued_requests or max_replicas.",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": str(BUSY_RETRY_AFTER_S)},
                )
            try:
                opening, stream = await self.open(model.name, backend, kind, body, route, streaming, deadline)
            except BackPressureError:
                busy.add(backend)
                continue
            except ReplicaFailed as err:
                failures += 1
                logger.warning("%s@%s failed before answering (attempt %d): %s", model.name, backend, failures, err)
                if failures > self.settings.retries:
                    raise OpenAIError(
                        503, f"`{requested}` failed before answering on {failures} replicas ({err}); "
                        f"retry shortly, and see `serve status` if it persists.",
                        headers={"Retry-After": str(BUSY_RETRY_AFTER_S)},
                    ) from None
                continue
            headers = {"x-raystack-backend": backend, "x-raystack-replica": opening.replica}
            if opening.chunk is None:
                self._done((model.name, backend))
                return JSONResponse(opening.body, status_code=opening.status, headers=headers)
            return StreamingResponse(
                self.relay(opening.chunk, stream, (model.name, backend), deadline),
                media_type="text/event-stream", headers=headers,
            )

    async def open(
        self, model: str, backend: str, kind: str, body: dict[str, Any], route: tuple[int, ...],
        streaming: bool, deadline: float,
    ) -> tuple[Opening, DeploymentResponseGenerator]:
        """Send the request to `backend` and wait for its opening (a stream's first chunk, or the whole
        JSON answer). The backend's in-flight count holds until the answer is fully relayed."""
        key = (model, backend)
        self.in_flight[key] += 1
        stream: DeploymentResponseGenerator = self.streams[model][backend].generate.remote(kind, body, route)
        first = asyncio.ensure_future(stream.__anext__())
        answered = False
        loop = asyncio.get_running_loop()
        try:
            # A stream's first token is bounded by first_token_timeout_s; a whole answer by the request's
            # deadline, except that no request waits longer than first_token_timeout_s for a replica.
            await asyncio.wait({first}, timeout=min(self.settings.first_token_timeout_s, deadline - loop.time()))
            if not first.done() and not streaming and self._replicas(model, backend) != 0:
                await asyncio.wait({first}, timeout=deadline - loop.time())
            if not first.done():
                raise self._timed_out(model, backend, streaming)
            try:
                opening = first.result()
            except BackPressureError:  # the backend's queue is full: forward() tries another backend
                raise
            except DeploymentUnavailableError as err:
                raise OpenAIError(503, f"`{model}@{backend}` is unavailable: {err}. See `serve status`.") from None
            except StopAsyncIteration:
                raise ReplicaFailed("it closed the answer without a word") from None
            except Exception as err:
                raise ReplicaFailed(f"{type(err).__name__}: {_last_line(err)}") from None
            answered = True
            return opening, stream
        finally:
            if not answered:  # failed, timed out, or the client left: free the replica
                first.cancel()
                first.add_done_callback(_retrieve)  # its exception is known and handled here
                stream.cancel()
                self._done(key)

    def _done(self, key: tuple[str, str]) -> None:
        self.in_flight[key] -= 1

    def _replicas(self, model: str, backend: str) -> int | None:
        return routing.RUNNING_REPLICAS.get(self.deployments[model][backend])

    def _timed_out(self, model: str, backend: str, streaming: bool) -> OpenAIError:
        if self._replicas(model, backend) == 0:
            return OpenAIError(
                503,
                f"No replica of `{model}@{backend}` came up within {self.settings.first_token_timeout_s:g} s "
                f"(router.first_token_timeout_s). It is scaling from zero or cannot start: `serve status` "
                f"shows which; retry shortly.",
                headers={"Retry-After": str(BUSY_RETRY_AFTER_S)},
            )
        limit = "first_token_timeout_s" if streaming else "request_timeout_s"
        return OpenAIError(
            504,
            f"`{model}@{backend}` did not answer within router.{limit}; its replicas are overloaded or stuck. "
            f"Retry later, or raise max_replicas.",
        )

    async def relay(
        self, first: str, stream: DeploymentResponseGenerator, key: tuple[str, str], deadline: float
    ) -> AsyncIterator[str]:
        served = "@".join(key)
        upstream_done = False
        try:
            yield first
            while True:
                try:
                    async with asyncio.timeout_at(deadline):  # one timer handle per chunk, no task
                        chunk = await stream.__anext__()
                except StopAsyncIteration:
                    upstream_done = True
                    return
                yield chunk
        # After the first token the status line is gone: the stream ends with an error event.
        except TimeoutError:
            self.metrics.error(key[0], 504)
            yield sse_event(error_body(504, f"`{served}` did not finish within router.request_timeout_s "
                                            f"({self.settings.request_timeout_s:g} s); the answer is incomplete."))
            yield SSE_DONE
        except Exception as err:
            upstream_done = True
            logger.warning("stream from %s broke: %r", served, err)
            self.metrics.error(key[0], 502)
            yield sse_event(error_body(502, f"The replica of `{served}` failed mid-stream ({type(err).__name__}); "
                                            f"the answer is incomplete. Retry the request."))
            yield SSE_DONE
        finally:
            if not upstream_done:  # the client went away or time ran out: stop the generation upstream
                stream.cancel()
            self._done(key)
