"""Router: the ingress deployment. Checks requests, resolves the model to its backends, forwards.

    POST /v1/chat/completions, /v1/completions   OpenAI API, streaming (SSE) or not
    GET  /v1/models                              the configured models
    GET  /health                                 200 while the router serves

`model` may name a backend explicitly as `model@backend` (benchmarks compare backends that way).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.exceptions import HTTPException as StarletteHTTPException

from raystack.serving.priority import restore_normal_priority
from raystack.serving.protocol import (
    REQUEST_MODELS,
    SSE_DONE,
    OpenAIError,
    error_body,
    parse_request,
    sse_event,
)

logger = logging.getLogger("ray.serve")

HEALTH_PROBE_TIMEOUT_S = 2.0

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


def _body_schema(kind: str) -> dict[str, Any]:
    # Bodies are parsed by hand (one pass, pass-through of engine-specific keys) but still documented
    # in the OpenAPI schema.
    schema = REQUEST_MODELS[kind].model_json_schema(ref_template="#/components/schemas/{model}")
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


async def _result(response: Any) -> Any:
    return await response


@serve.deployment
@serve.ingress(app)
class Router:
    def __init__(self, models: dict[str, dict[str, Any]], backends: dict[str, dict[str, DeploymentHandle]]):
        restore_normal_priority()
        # models: name -> {"source": ..., "backends": [...]} for /v1/models
        self.models = models
        self.backends = backends
        self.created = int(time.time())
        self._round_robin = {name: itertools.cycle(list(b)) for name, b in backends.items()}

    def pick_backend(self, requested: str) -> tuple[str, DeploymentHandle]:
        """Resolve `model` or `model@backend` to (model name, handle)."""
        name, _, pinned = requested.partition("@")
        backends = self.backends.get(name)
        if backends is None:
            raise OpenAIError(
                404,
                f"The model `{requested}` does not exist. Available models: {', '.join(sorted(self.backends))}.",
                param="model",
                code="model_not_found",
            )
        if pinned:
            if pinned not in backends:
                raise OpenAIError(
                    404,
                    f"Model `{name}` has no backend `{pinned}`. Its backends: {', '.join(backends)}.",
                    param="model",
                    code="model_not_found",
                )
            return name, backends[pinned]
        return name, backends[next(self._round_robin[name])]

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        """200 once every model has a backend with a ready replica; 503 (and which) until then."""
        waiting = [name for name, backends in self.backends.items() if not await self._any_ready(backends)]
        if waiting:
            raise OpenAIError(
                503,
                f"No replica is ready yet for: {', '.join(waiting)}. Models take a while to load after "
                f"start; `serve status` shows their progress.",
                headers={"Retry-After": "5"},
            )
        return {"status": "ok"}

    @staticmethod
    async def _any_ready(backends: dict[str, DeploymentHandle]) -> bool:
        for handle in backends.values():
            response = handle.ready.remote()
            try:
                # A call queues while no replica has finished loading: bound the wait.
                await asyncio.wait_for(_result(response), HEALTH_PROBE_TIMEOUT_S)
                return True
            except Exception:
                response.cancel()
        return False

    @app.get("/v1/models")
    async def list_models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "raystack",
                    "root": info["source"],
                    "backends": info["backends"],
                }
                for name, info in self.models.items()
            ],
        }

    @app.post("/v1/chat/completions", openapi_extra=_body_schema("chat"))
    async def chat_completions(self, request: Request):
        return await self.forward("chat", request)

    @app.post("/v1/completions", openapi_extra=_body_schema("completion"))
    async def completions(self, request: Request):
        return await self.forward("completion", request)

    async def forward(self, kind: str, request: Request):
        body = parse_request(kind, await request.body())
        requested = body["model"]
        body["model"], handle = self.pick_backend(requested)
        stream: DeploymentResponseGenerator = handle.options(stream=True).generate.remote(kind, body)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            raise OpenAIError(502, f"The backend for `{requested}` closed the response without answering.")
        except Exception as err:
            logger.warning("request to %s failed before its answer: %r", requested, err)
            raise OpenAIError(
                503, f"The backend for `{requested}` is unavailable ({type(err).__name__}); retry shortly.",
                headers={"Retry-After": "1"},
            ) from None
        if isinstance(first, tuple):
            status, payload = first
            return JSONResponse(payload, status_code=status)
        return StreamingResponse(self.relay(first, stream, requested), media_type="text/event-stream")

    async def relay(self, first: str, stream: DeploymentResponseGenerator, requested: str) -> AsyncIterator[str]:
        finished = False
        try:
            yield first
            async for chunk in stream:
                yield chunk
            finished = True
        except Exception as err:
            # After the first token the status line is gone: end the stream with an error event.
            logger.warning("stream from %s broke: %r", requested, err)
            yield sse_event(error_body(502, f"The backend for `{requested}` failed mid-stream ({type(err).__name__}); the answer is incomplete."))
            yield SSE_DONE
            finished = True
        finally:
            if not finished:  # the client went away: stop the generation upstream
                stream.cancel()
