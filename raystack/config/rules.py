"""The rules a router and its backends must satisfy together, in one place: a whole config (run_stack), a
file's applications as `raystack config check` and `raystack plan` assemble them, and the running router's
catalogue of what `serve run` or `serve deploy` deployed (router/catalogue.py, from Serve's state) are held
to the same ones.

Each backend with its router: the variable of the router's keys withheld from its replicas, a drain bound
no shorter than the longest answer the router allows, and what its engine can honour of the router's
settings (EngineSpec.router_problems). The models together: adapters served by some backend, each name
clients send meaning one thing, weighted routing with some weight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from raystack.config.strict import require_unique
from raystack.engines.base import registry

if TYPE_CHECKING:
    from raystack.config.backend import Backend
    from raystack.config.model import Model
    from raystack.config.router import RouterConfig


def backend_problems(router: RouterConfig, backend: Backend, withheld_env: list[str]) -> list[str]:
    """Why `backend`, its replicas' environment blanking `withheld_env`, cannot serve under `router`."""
    problems = []
    keys, drain = router.api_keys, backend.longest_answer_s
    if keys and keys.env and keys.env not in withheld_env:
        problems.append(f"withheld_env must name {keys.env}, the variable the router reads its API keys from, or "
                        f"the backend's replicas and engines would hold the keys")
    if drain < router.request_timeout_s:
        problems.append(f"backend.graceful_shutdown_timeout_s ({drain:g} s) is shorter than router.request_timeout_s "
                        f"({router.request_timeout_s:g} s): a redeploy would cut answers still running. Raise it to "
                        f"at least {router.request_timeout_s:g}")
    return problems + backend.spec.router_problems(backend, router)


def check_backend(router: RouterConfig, model: str, backend: Backend, withheld_env: list[str]) -> None:
    """backend_problems as one ValueError naming the backend (`model@backend`, as clients pin it)."""
    problems = backend_problems(router, backend, withheld_env)
    if problems:
        raise ValueError(f"{model}@{backend.name}: " + "; ".join(problems))


def check_models(models: list[Model]) -> None:
    """The rules across a service's models; a ValueError says the first broken one."""
    for model in models:  # on the whole model: a synthetic backend may stand beside the one serving adapters
        if model.adapters and not any(b.spec.serves_adapters for b in model.backends):
            takers = [e.name for e in registry().values() if e.serves_adapters]
            raise ValueError(f"model {model.name}: no backend serves its LoRA adapters; give it a backend of "
                             f"engine: {' or '.join(takers)}, or remove adapters")
    # Clients name a model or an adapter alike in `model`: each name must mean one thing.
    adapters = [a.name for m in models for a in m.adapters]
    require_unique("adapter names across models", adapters)
    taken = sorted({m.name for m in models} & set(adapters))
    if taken:
        raise ValueError(f"adapters named like a model: {taken}; give each adapter a name of its own")
    for model in models:
        if model.routing.policy == "weighted" and not any(b.weight > 0 for b in model.backends):
            raise ValueError(f"model {model.name}: routing.policy weighted needs a backend with weight above 0")


def check_service(router: RouterConfig, models: list[Model], withheld_env: list[str]) -> None:
    """Every rule: the models together, then each backend with the router."""
    check_models(models)
    for model in models:
        for backend in model.backends:
            check_backend(router, model.name, backend, withheld_env)
