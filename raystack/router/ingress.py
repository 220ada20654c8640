"""The Router: raystack's ingress deployment, the OpenAI-compatible HTTP endpoint.

    POST /v1/chat/completions, /v1/completions   OpenAI API, streaming (SSE) or not
    GET  /v1/models                              the models of the backend applications that name it
    GET  /health                                 200 once every model can answer
    GET  /health/models                          each model's readiness and running replicas
    GET  /playground                             a page comparing backends or models side by side (playground.py)

Each request is one Exchange (exchange.py), its owner until it is settled. Here it is authenticated (API
keys), read within bounds and checked (admission.py), parsed once (400 with the offending `param`) and
resolved to its model: `model`, or `model@backend` to pin a backend (benchmarks compare backends that way),
among the backends the router last found in Serve's state (catalogue.py); those that cannot honour it
(tools on a backend without a tool parser, say) are left out. Then forwarding.py takes it to a backend.
Each answer names who served it in the headers x-raystack-backend and x-raystack-replica, and the router
replica that relayed it in x-raystack-router, and the priority class it was served in x-raystack-priority
(priority.py); under kv_aware, x-raystack-cached-tokens-expected says how many prompt tokens the router found
in that replica's KV cache (what the engine's usage should report cached).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from raystack.config import Model, RouterConfig
from raystack.engines.base import RequestKind
from raystack.json_codec import JSONAnswer
from raystack.observability.access_log import AccessLog
from raystack.observability.metrics import RouterMetrics
from raystack.process import restore_normal_priority
from raystack.protocol import REQUEST_MODELS, OpenAIError, error_body, parse_request
from raystack.replica.chunk_channel import Inbox
from raystack.router.admission import ClientWatch, backends_unable, check_length_bounds, read_body
from raystack.router.auth import APIKeyError, APIKeys, KeyFileWatch
from raystack.router.catalogue import (REFRESH_S, BackendRef, Catalogue, registered_backends, target_replicas,
                                        serve_details_async)
from raystack.router.exchange import Exchange
from raystack.router.forwarding import BUSY_RETRY_AFTER_S, Forwarder
from raystack.router.listener import Entrance, Listener
from raystack.router.playground import routes as playground_routes
from raystack.router.priority import HEADER as PRIORITY_HEADER
from raystack.router.priority import Priorities
from raystack.router.quotas import Quotas

logger = logging.getLogger("ray.serve")

app = FastAPI(
    title="raystack",
    description="OpenAI-compatible API served by raystack (Ray Serve + vLLM / MindIE).",
    version="0.1.0",
)
app.include_router(playground_routes)


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


# What `model` may be, as the Router serving this process names it: each model and each model@backend.
# In the schema, so a client generator or a fuzzer reaches the request logic instead of a 404.
SERVED_MODELS: list[str] = []


def name_models_in_schema(names: list[str]) -> None:
    SERVED_MODELS[:] = names
    app.openapi_schema = None


def _openapi() -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = copy.deepcopy(get_openapi(title=app.title, version=app.version, description=app.description,
                                           routes=app.routes))  # the routes' openapi_extra stay as they are
        schema.setdefault("components", {}).setdefault("schemas", {}).update(BODY_COMPONENTS)
        for operation in (op for path in schema["paths"].values() for op in path.values()):
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            if SERVED_MODELS and "model" in body.get("properties", {}):
                body["properties"]["model"]["enum"] = list(SERVED_MODELS)
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi


@serve.deployment
@serve.ingress(app)
class Router:
    # Serve ships this class by value (cloudpickle), copying the module globals it uses: the RoutingBoard
    # it shares with the request routers is reached through its module (in forwarding), imported, not copied.

    async def __init__(self, settings: dict[str, Any], api_keys: APIKeys | None = None):
        """`settings`: config.RouterConfig; `api_keys`: the keys' digests, as build_router read them."""
        restore_normal_priority()
        self.settings = RouterConfig.model_validate(settings)
        self.api_keys = api_keys
        source = self.settings.api_keys
        self.key_file = KeyFileWatch(Path(source.file).expanduser()) if source and source.file else None
        self.metrics = RouterMetrics()
        self.inbox = Inbox()  # replicas stream to it directly (chunk_channel.py), on the node's Ray address
        await self.inbox.start(ray.util.get_node_ip_address())
        self.forwarder = Forwarder(self.settings, self.metrics, self.inbox)
        self.priorities = Priorities(self.settings.priority)
        self.access_log = AccessLog() if self.settings.access_log else None
        self.catalogue = Catalogue(None, {})
        self.seen: list[BackendRef] = []  # the backend applications of the last look
        self.created = int(time.time())
        context = serve.get_replica_context()
        self.app_name = context.app_name  # backend applications name the router they belong to
        self.deployment = context.deployment
        self.replica = context.replica_id.unique_id
        self.metrics.router = self.replica
        self.quotas = Quotas(self.app_name, self.settings.request_timeout_s, self.replica)  # keys' limits, shared
        self.looked = -REFRESH_S  # loop time of the last look at Serve's state
        details = await serve_details_async()
        await self.refresh(details)
        self.reload_keys()  # the file as it is now, which may have changed since the app was built
        self.refresher = asyncio.create_task(self._keep_refreshed())
        self.listener = self._listen(details)

    def _listen(self, details: dict[str, Any]) -> Listener | None:
        """One hop (listener.py): this replica's own HTTP server, when the router listens itself (`details`:
        Serve's, for its HTTP options, proxy and this application's route prefix)."""
        http = details.get("http_options") or {}
        port = self.settings.listening_port(http, details.get("proxy_location"))
        if port is None:
            return None
        route_prefix = (details.get("applications", {}).get(self.app_name) or {}).get("route_prefix", "/")
        entrance = Entrance(app, route_prefix, self.app_name, self.settings.max_ongoing_requests,
                            self.settings.max_queued_requests, BUSY_RETRY_AFTER_S)
        listener = Listener(entrance, http.get("host") or "127.0.0.1", port)
        listener.start(ready=lambda: serve.get_replica_context().servable_object is self)
        return listener

    def check_health(self) -> None:
        failure = self.listener and self.listener.failure()
        if failure:
            raise RuntimeError(failure)  # Serve replaces this replica
        index = self.forwarder.board.kv.index  # Serve calls this every health_check_period_s: the gauges follow
        if index.replicas():
            self.metrics.kv_index(self.replica, sum(map(index.blocks, index.replicas())), index.approx_bytes())

    async def __del__(self) -> None:
        """Serve's shutdown hook for a replica (see LLMServer.__del__): the listener stops taking connections
        (the node's other replicas take them) and relays what it has under way to its end."""
        listener = getattr(self, "listener", None)  # absent when __init__ failed
        if listener is not None:
            await listener.stop(self.settings.request_timeout_s)
        inbox = getattr(self, "inbox", None)
        if inbox is not None:
            await inbox.stop()

    @property
    def models(self) -> dict[str, Model]:
        return self.catalogue.models

    async def refresh(self, details: dict[str, Any] | None = None) -> None:
        """Look at Serve's state (`details`, if just read) for this router's backend applications; adopt
        what changed."""
        self.looked = asyncio.get_running_loop().time()
        details = details or await serve_details_async()
        # Each router replica fills its part of a backend's slots (fair_share.py) and takes its part of a
        # key's lease (quotas.py).
        self.forwarder.router_replicas = self.quotas.replicas = max(
            1, target_replicas(details, self.app_name, self.deployment))
        refs = registered_backends(details, self.app_name)
        if refs == self.seen:
            return
        self.seen = refs
        self.catalogue = Catalogue.of(self.settings, refs)
        self.forwarder.update(self.catalogue)
        name_models_in_schema([name for m in self.models.values() for base in (m.name, *(a.name for a in m.adapters))
                               for name in (base, *(f"{base}@{b.name}" for b in m.backends))])
        logger.info("router %s serves: %s", self.app_name,
                    ", ".join(f"{m}@{b} ({ref.app})" for (m, b), ref in self.catalogue.refs.items()) or "nothing yet")

    async def _keep_refreshed(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            await self.refresh_or_keep()
            self.reload_keys()
            await self.quotas.flush()  # the usage book to GCS, within REFRESH_S of the last answer

    def reload_keys(self) -> None:
        """A key file that changed is read again and replaces the keys whole; one that does not parse, or
        names a model this router does not serve, leaves the last good keys in place, said in the log."""
        if self.key_file is None or not self.key_file.changed():
            return
        try:  # a router that serves nothing yet cannot tell an unknown model from one still deploying
            path, classes = str(self.key_file.path), self.settings.priority.names
            keys = (APIKeys.load_for(self.models, file=path, classes=classes) if self.models
                    else APIKeys.load(file=path, classes=classes))
        except APIKeyError as err:
            logger.error("router %s keeps its API keys: %s", self.app_name, err)
            return
        if keys.grants != self.api_keys.grants:
            logger.info("router %s: API keys read again from %s: %s", self.app_name, keys.where,
                        ", ".join(sorted(g.name for g in keys.grants.values())))
        self.api_keys = keys

    async def refresh_or_keep(self) -> None:
        try:
            await self.refresh()
        except Exception as err:  # the controller restarting, say: keep the catalogue, look again later
            logger.warning("router %s could not read Serve's state: %r", self.app_name, err)

    async def resolve(self, requested: str) -> tuple[Model, str | None, str | None]:
        """`model`, `adapter`, or either @backend -> (model, pinned backend or None, adapter or None). A name
        not known yet is looked up again in Serve's state (at most once a second): its backend may have been
        deployed a moment ago."""
        name, _, pinned = requested.partition("@")
        known = name in self.models or name in self.catalogue.adapters
        if not known and asyncio.get_running_loop().time() - self.looked > 1:
            await self.refresh_or_keep()
        model, adapter = self.catalogue.adapters.get(name, (self.models.get(name), None))
        if model is None:
            adapters = ", ".join(f"{a} (of {m.name})" for a, (m, _) in sorted(self.catalogue.adapters.items()))
            raise OpenAIError(
                404,
                f"The model `{requested}` does not exist. Available models: "
                f"{', '.join(sorted(self.models)) or 'none yet (no backend application names this router)'}"
                + (f"; LoRA adapters: {adapters}." if adapters else "."),
                param="model",
                code="model_not_found",
            )
        backends = [b.name for b in model.backends]
        if pinned and pinned not in backends:
            raise OpenAIError(
                404,
                f"Model `{model.name}` has no backend `{pinned}`. Its backends: {', '.join(backends)}.",
                param="model",
                code="model_not_found",
            )
        return model, pinned or None, adapter and adapter.name

    def readiness(self, model: Model) -> dict[str, Any]:
        """`model` as this router sees it, asking no engine: each backend's running replicas (Serve counts a
        replica once its engine has loaded and its health check passed) and whether it can answer now or
        scales from zero on demand."""
        replicas = {b.name: self.forwarder.running_replicas(model.name, b.name) or 0 for b in model.backends}
        on_demand = all(b.autoscaling.min_replicas == 0 for b in model.backends)
        return {"id": model.name, "ready": on_demand or any(replicas.values()),
                "backends": [{"name": name, "replicas": count} for name, count in replicas.items()]}

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        """200 once every model can answer: a backend has a running replica, or the model scales from zero.
        503 (and which) until then. From the router's own view, so it costs no engine a slot and stays
        200 at full load (a load balancer probing it must not pull the endpoint at peak)."""
        if not self.models:
            raise OpenAIError(
                503,
                f"No backend application names this router ({self.app_name}) yet; `serve status` shows which "
                f"applications are deploying.",
                headers={"Retry-After": "5"},
            )
        waiting = [m.name for m in self.models.values() if not self.readiness(m)["ready"]]
        if waiting:
            raise OpenAIError(
                503,
                f"No replica is ready yet for: {', '.join(waiting)}. Models take a while to load after "
                f"start; `serve status` shows their progress.",
                headers={"Retry-After": "5"},
            )
        return {"status": "ok"}

    @app.get("/health/models")
    async def model_readiness(self, request: Request) -> dict[str, Any]:
        """Which models can answer now, with each backend's running replicas (those the key may use)."""
        key = self.authenticate(request)
        return {"object": "list", "data": [self.readiness(m) for m in self.models.values()
                                           if key is None or self.api_keys.may_use(key, m.name)]}

    def authenticate(self, request: Request) -> str | None:
        """The digest of the request's API key (None when keys are off); 401 without a valid one."""
        return self.api_keys.check(request.headers.get("authorization")) if self.api_keys else None

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> dict[str, Any]:
        """The models, and each LoRA adapter with its model as `parent` (as vLLM and MindIE list theirs)."""
        key = self.authenticate(request)
        listed = []
        for model in self.models.values():
            if key is not None and not self.api_keys.may_use(key, model.name):
                continue
            card = {"object": "model", "created": self.created, "owned_by": "raystack"}
            listed.append(card | {"id": model.name, "root": model.source, "parent": None,
                                  "backends": [b.name for b in model.backends]})
            takers = [b.name for b in model.backends if b.spec.serves_adapters]
            listed += [card | {"id": a.name, "root": a.source, "parent": model.name, "backends": takers}
                       for a in model.adapters]
        return {"object": "list", "data": listed}

    @app.post("/v1/chat/completions", openapi_extra=_body_schema("chat"))
    async def chat_completions(self, request: Request):
        return await self.forward("chat", request)

    @app.post("/v1/completions", openapi_extra=_body_schema("completion"))
    async def completions(self, request: Request):
        return await self.forward("completion", request)

    async def forward(self, kind: RequestKind, request: Request):
        exchange = Exchange(kind, self.quotas, self.metrics, self.access_log)
        client = ClientWatch()
        try:
            return await self._forward(exchange, request, client)
        except asyncio.CancelledError:
            if not client.left:
                raise
            asyncio.current_task().uncancel()  # the request's own end, not the server's: answered, to nobody
            exchange.status = 499
            exchange.close()
            return Response(status_code=499)
        except BaseException as err:
            refused = isinstance(err, OpenAIError)
            if refused:
                self.metrics.error(exchange.model_name, err.status)
                err.headers = (err.headers or {}) | {"x-raystack-router": self.replica}  # errors name it too
                exchange.status = err.status
            else:  # cancelled by Serve (its proxy saw the client leave), or a failure of the router's own
                exchange.status = 499 if isinstance(err, asyncio.CancelledError) else 500
            exchange.close(error=refused)  # a key's request that ended before any engine answered: booked
            if refused:
                await exchange.settled()
            raise
        finally:
            client.stop()

    async def _forward(self, exchange: Exchange, request: Request, client: ClientWatch):
        key = self.authenticate(request)  # before anything else: no hints to a caller without a key
        exchange.grant = self.api_keys.grants.get(key) if key is not None else None
        raw = await read_body(request, self.settings.max_request_bytes, self.settings.body_timeout_s)
        client.start(request.receive)
        body = exchange.body = parse_request(exchange.kind, raw)
        exchange.size = len(raw)
        exchange.band = self.priorities.of(exchange.grant and exchange.grant.priority,
                                           request.headers.get(PRIORITY_HEADER), body)
        exchange.requested = body["model"]
        exchange.model, exchange.pinned, exchange.adapter = await self.resolve(exchange.requested)
        if key is not None:
            self.api_keys.require(key, exchange.model.name)
        check_length_bounds(exchange.model, body)
        exchange.unable = backends_unable(exchange.model, exchange.pinned, exchange.kind, body, exchange.adapter)
        body["model"] = exchange.adapter or exchange.model.name  # the engines serve an adapter under its own name
        if exchange.grant:
            await exchange.admit()
        delivery = await self.forwarder.send(exchange)
        headers = {"x-raystack-backend": delivery.backend, "x-raystack-replica": delivery.opening.replica,
                   "x-raystack-router": self.replica, PRIORITY_HEADER: exchange.band.name}
        if delivery.cached_tokens is not None:
            headers["x-raystack-cached-tokens-expected"] = str(delivery.cached_tokens)
        if delivery.opening.chunk is None:
            exchange.status = delivery.opening.status
            await exchange.answered_whole()
            return JSONAnswer(delivery.opening.body, status_code=delivery.opening.status, headers=headers)
        return StreamingResponse(exchange.streamed(self.forwarder.relay(delivery)), media_type="text/event-stream",
                                 headers=headers)
