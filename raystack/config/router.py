"""The router application's `args` (RouterConfig): its replicas, limits, timeouts, where it reads API keys, and
its priority classes."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from raystack.config.priority import PriorityClasses
from raystack.config.strict import Strict

# The longest a request may take in all unless the router says otherwise; also a backend's drain bound
# when it sets none (Backend.longest_answer_s), since a backend application cannot see its router's args.
DEFAULT_REQUEST_TIMEOUT_S = 3600
PROXY_DISABLED = "Disabled"  # Serve's proxy_location when it runs no HTTP proxy


class APIKeySource(Strict):
    """Where the router reads its API keys: one of an environment variable or a file (raystack.router.auth)."""

    env: str | None = Field(None, min_length=1, description="environment variable holding the keys")
    file: str | None = Field(None, min_length=1, description="file holding the keys, on every router node")

    @model_validator(mode="after")
    def _one_source(self) -> APIKeySource:
        if (self.env is None) == (self.file is None):
            raise ValueError("set exactly one of env: VARIABLE or file: PATH")
        return self


class RouterConfig(Strict):
    cpus: float = Field(
        0.1, ge=0, description="CPUs Ray reserves per router replica; small so it always schedules"
    )
    num_replicas: int = Field(
        1, ge=1, description="router replicas; two or more on a cluster, so losing one cuts only its own streams"
    )
    max_ongoing_requests: int = Field(1024, ge=1, description="requests one router replica handles at once")
    max_queued_requests: int = Field(
        1024, ge=1, description="requests waiting for a router replica past max_ongoing_requests; beyond it "
        "clients get 429 with Retry-After (unbounded, a burst would queue in the proxy without end)"
    )
    port: int | None = Field(
        None, ge=1, le=65535, description="the port the router's replicas take requests on themselves (one hop, "
        "no Serve proxy in between), on http_options.host; unset: http_options.port when proxy_location is "
        "Disabled, else Serve's proxy reaches the router (router/listener.py)"
    )
    first_token_timeout_s: float = Field(
        300, gt=0, description="longest wait for a request's first token (queueing, scale-up and prefill "
        "included): then 503 when no replica came up, else 504"
    )
    request_timeout_s: float = Field(
        DEFAULT_REQUEST_TIMEOUT_S, gt=0,
        description="longest a request may take in all; a stream past it ends with an error event"
    )
    retries: int = Field(
        2, ge=0, description="times a request is resent to another replica when one fails before the first token"
    )
    max_request_bytes: int = Field(
        8 << 20, ge=1024, description="largest request body accepted; a larger one gets 413 before it is read"
    )
    body_timeout_s: float = Field(
        60, gt=0, description="longest a request body may take to arrive; a stalled one gets 408"
    )
    api_keys: APIKeySource | None = Field(
        None, description="require `Authorization: Bearer KEY` on /v1/*; keys from an env var or a file"
    )
    access_log: bool = Field(
        True, description="a line per request on the router replica's stderr (`serve run`'s console, the replica's "
        "log in Ray's dashboard): status, time, model, backend, replica, key name and priority class; never the key "
        "or the prompt"
    )
    priority: PriorityClasses = Field(
        default_factory=PriorityClasses, description="priority classes, most urgent first, and the default one: "
        "a full backend admits waiting requests class by class and sheds the sheddable ones first (config/priority.py)"
    )

    def listening_port(self, http_options: dict[str, Any], proxy_location: str) -> int | None:
        """The port this router's replicas listen on themselves (router/listener.py), or None when Serve's
        proxy reaches them. Serve's proxy binds its port with SO_REUSEPORT (ray/serve/_private/proxy.py):
        a router on that port would silently share its connections, so that is refused."""
        if self.port is not None:
            if proxy_location != PROXY_DISABLED and self.port == http_options.get("port"):
                raise ValueError(
                    f"router port {self.port} is Serve's proxy's port (http_options.port, proxy_location: "
                    f"{proxy_location}): the two would share its connections. Set proxy_location: Disabled for "
                    f"the router to take the port alone, or give the router another port")
            return self.port
        return http_options.get("port") if proxy_location == PROXY_DISABLED else None
