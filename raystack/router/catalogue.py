"""The router's catalogue: the models it serves and the backend applications that serve them, found at run
time in Serve's own state.

Each backend is a Serve application of its own (config.BackendApp), so that `serve deploy` of a changed
backend redeploys that backend alone. Its LLMServer deployment carries its BackendApp as Serve's
`user_config` (app.deployment_options): the controller keeps it with the deployment and reports it in its
instance details, the view the dashboard shows. The router reads that view every few seconds: a backend
deployed, changed or deleted is in its catalogue at the next look, with nothing registered elsewhere that
could outlive it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from pydantic import ValidationError

from raystack.config import Adapter, BackendApp, Model, RaystackConfig, RouterConfig

logger = logging.getLogger("ray.serve")

REGISTRATION = "raystack_backend"  # the key of a backend's BackendApp in its deployment's user_config
REFRESH_S = 5.0  # how often a router looks at Serve's state for its backends


@dataclass(frozen=True)
class BackendRef:
    """One backend application the router serves: where its deployment is, and what it is."""

    app: str
    deployment: str
    spec: BackendApp


def registered_backends(details: dict[str, Any], router: str) -> list[BackendRef]:
    """The backend applications in Serve's instance details (`details`) that name the router `router`."""
    found = []
    for app_name, app in sorted((details.get("applications") or {}).items()):
        if app.get("status") == "DELETING":
            continue
        for name, deployment in sorted((app.get("deployments") or {}).items()):
            registration = ((deployment.get("deployment_config") or {}).get("user_config") or {}).get(REGISTRATION)
            if not registration or registration.get("router") != router:
                continue
            try:
                found.append(BackendRef(app_name, name, BackendApp.model_validate(registration)))
            except ValidationError as err:  # a raystack of another version: say so, serve the rest
                logger.warning("backend application %s: not a backend this router understands: %s", app_name, err)
    return found


def target_replicas(details: dict[str, Any], app: str, deployment: str) -> int:
    """How many replicas of `deployment` in application `app` Serve aims to run (those starting included),
    from Serve's instance details; 0 if it is not there."""
    found = ((details.get("applications") or {}).get(app) or {}).get("deployments", {}).get(deployment) or {}
    return int(found.get("target_num_replicas") or 0)


@dataclass(frozen=True)
class Catalogue:
    """What a router serves: its settings and models (a RaystackConfig, None while it has no backend), and
    where each (model, backend) is deployed."""

    config: RaystackConfig | None
    refs: dict[tuple[str, str], BackendRef]

    @cached_property  # read by every request: built once per catalogue
    def models(self) -> dict[str, Model]:
        return {m.name: m for m in self.config.models} if self.config else {}

    @cached_property
    def adapters(self) -> dict[str, tuple[Model, Adapter]]:
        """Each LoRA adapter by its name, with the model it adapts."""
        return {a.name: (m, a) for m in self.models.values() for a in m.adapters}

    @classmethod
    def of(cls, router: RouterConfig, refs: list[BackendRef]) -> Catalogue:
        """The catalogue `refs` make. A backend that cannot join the others (a model's backends that disagree
        on its source, a backend name taken twice) is left out, and said, not the whole catalogue."""
        try:
            whole = RaystackConfig.assemble(router, [r.spec for r in refs]) if refs else None
            return cls(whole, {(r.spec.model.name, r.spec.backend.name): r for r in refs})
        except ValueError:
            pass  # find which: one at a time
        accepted: list[BackendRef] = []
        config = None
        for ref in refs:
            try:
                config = RaystackConfig.assemble(router, [r.spec for r in (*accepted, ref)])
            except ValueError as err:  # pydantic's ValidationError is one
                logger.error("backend application %s left out: %s", ref.app, err)
                continue
            accepted.append(ref)
        return cls(config, {(r.spec.model.name, r.spec.backend.name): r for r in accepted})


def serve_controller() -> Any:
    """Serve's controller actor; ValueError while Serve has not started."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)


async def serve_details_async() -> dict[str, Any]:
    """Serve's instance details (applications, deployments and their configs), from its controller."""
    return await serve_controller().get_serve_instance_details.remote()


def serve_details() -> dict[str, Any]:
    import ray

    return ray.get(serve_controller().get_serve_instance_details.remote(), timeout=60)
