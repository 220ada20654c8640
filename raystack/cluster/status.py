"""`raystack status`: nodes and their NPUs (type, HBM, who holds them) and engines, Serve apps and replicas,
and backends the cluster cannot host, as a terminal table or JSON."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from raystack.cluster.chips import ACCELERATOR_LABEL, FAMILY_LABEL, HBM_LABEL
from raystack.cluster.placement import NPUDemand, bundles_demand, cluster_capacity, engines_offered, fit_problem


def _dashboard_url() -> str:
    """The dashboard of the cluster this process is connected to, as its own GCS records it. Ray's state
    API would otherwise pick a cluster by itself: with several Ray instances on a machine, the newest."""
    import ray
    from ray.dashboard.utils import ray_address_to_api_server_url

    return ray_address_to_api_server_url(ray.get_runtime_context().gcs_address)


def _dashboard_url_or_none() -> str | None:
    try:
        return _dashboard_url()
    except ConnectionError:  # started without a dashboard (or it could not bind its port)
        return None


def _npu_holders() -> dict[str, list[tuple[str, float]]]:
    """node id -> [(holder, NPUs)]: placement groups (multi-NPU replicas) and single-NPU actors."""
    import ray
    from ray.util.state import list_actors

    holders: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for pg in ray.util.placement_group_table().values():
        if pg.get("state") != "CREATED":
            continue
        per_node: dict[str, float] = defaultdict(float)
        for idx, bundle in pg.get("bundles", {}).items():
            node = pg.get("bundles_to_node_id", {}).get(idx)
            if node and bundle.get("NPU"):
                per_node[node] += bundle["NPU"]
        for node, count in per_node.items():
            holders[node].append((pg.get("name") or pg["placement_group_id"][:8], count))
    dashboard = _dashboard_url_or_none()
    alive = list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], detail=True,
                        raise_on_missing_output=False) if dashboard else []
    for actor in alive:
        npus = (actor.required_resources or {}).get("NPU")
        if npus and not actor.placement_group_id:
            holders[actor.node_id].append((actor.name or actor.class_name, npus))
    return holders


def _waiting_for_npus(selectors: dict[str, dict[str, str]]) -> list[tuple[str, NPUDemand]]:
    """Replicas Ray has not placed yet that need NPUs: pending placement groups and actors. A placement
    group does not carry its label selector in Ray's table: Serve's deployment config (`selectors`,
    app/deployment -> selector) says it."""
    import ray
    from ray.util.state import list_actors

    waiting = []
    for pg in ray.util.placement_group_table().values():
        if pg.get("state") in ("PENDING", "RESCHEDULING"):
            # Serve names a replica's group SERVE_REPLICA::<app>#<deployment>#<replica id>
            name = (pg.get("name") or pg["placement_group_id"]).removeprefix("SERVE_REPLICA::").replace("#", "/")
            selector = selectors.get("/".join(name.split("/")[:2]), {})
            demand = bundles_demand(list(pg.get("bundles", {}).values()), pg.get("strategy", "PACK"), selector)
            if demand.npus:
                waiting.append((name, demand))
    dashboard = _dashboard_url_or_none()
    pending = list_actors(address=dashboard, filters=[("state", "=", "PENDING_CREATION")], detail=True,
                          raise_on_missing_output=False) if dashboard else []
    for actor in pending:
        demand = bundles_demand([actor.required_resources or {}], selector=getattr(actor, "label_selector", None))
        if demand.npus and not actor.placement_group_id:
            waiting.append((actor.name or actor.class_name, demand))
    return waiting


def _selectors(details: dict[str, Any]) -> dict[str, dict[str, str]]:
    """app/deployment -> the label selector its replicas' NPUs must satisfy. Serve's details leave out a
    deployment's placement-group options; raystack puts the selector on the replica actor as well
    (app.deployment_options), which they show."""
    selectors = {}
    for app_name, app in (details.get("applications") or {}).items():
        for dep_name, dep in (app.get("deployments") or {}).items():
            actor = (dep.get("deployment_config") or {}).get("ray_actor_options") or {}
            selectors[f"{app_name}/{dep_name}"] = actor.get("label_selector") or {}
    return selectors


def _serve_details() -> dict[str, Any]:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient
    dashboard = _dashboard_url_or_none()
    if dashboard is None:
        return {"error": "this Ray cluster has no dashboard; Serve's state is read through it"}
    try:
        return ServeSubmissionClient(dashboard).get_serve_details()
    except Exception as err:  # Serve not running, dashboard down
        return {"error": f"{type(err).__name__}: {err}"}


def gather(address: str = "auto") -> dict[str, Any]:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    nodes = cluster_capacity()
    holders = _npu_holders()
    out: dict[str, Any] = {"nodes": [], "applications": [], "problems": []}
    for n in nodes:
        out["nodes"].append({
            "node_id": n.node_id,
            "address": n.address,
            "npu_type": n.labels.get(ACCELERATOR_LABEL) or n.labels.get(FAMILY_LABEL),
            "hbm_gib": n.labels.get(HBM_LABEL),
            "npus": n.npu_total,
            "npus_free": n.npu_free,
            "engines": engines_offered(n.labels),
            "held_by": [{"holder": h, "npus": c} for h, c in holders.get(n.node_id, [])],
        })

    details = _serve_details()
    if "error" in details:
        out["serve_error"] = details["error"]
    for app_name, app in (details.get("applications") or {}).items():
        deployments = []
        for dep_name, dep in (app.get("deployments") or {}).items():
            states: dict[str, int] = defaultdict(int)
            for replica in dep.get("replicas") or []:
                states[replica.get("state", "?")] += 1
            deployments.append({
                "name": dep_name, "status": dep.get("status"), "replicas": dict(states),
                "message": dep.get("message") or "",
            })
        out["applications"].append({
            "name": app_name, "status": app.get("status"), "message": app.get("message") or "",
            "deployments": deployments,
        })
    # Ray keeps an unplaceable replica pending without a word: say why, in NPUs.
    for name, demand in _waiting_for_npus(_selectors(details)):
        never, not_now = fit_problem(name, demand, nodes)
        out["problems"].append(never or not_now or f"replica {name} is waiting for {demand.npus:g} NPUs")
    return out


def render(status: dict[str, Any]) -> str:
    lines = ["NODES", f"  {'address':16} {'NPU type':14} {'HBM GiB':>7} {'NPUs':>5} {'free':>5}  "
                      f"{'engines':24} held by"]
    for n in status["nodes"]:
        held = ", ".join(f"{h['holder']} ({h['npus']:g})" for h in n["held_by"]) or "-"
        lines.append(
            f"  {n['address']:16} {n['npu_type'] or '-':14} {n['hbm_gib'] or '-':>7} "
            f"{n['npus']:>5g} {n['npus_free']:>5g}  {', '.join(n['engines']) or '-':24} {held}"
        )
    lines.append("")
    lines.append("SERVE")
    if status.get("serve_error"):
        lines.append(f"  not reachable: {status['serve_error']}")
    if not status["applications"] and not status.get("serve_error"):
        lines.append("  no applications (serve run deploy_configs/<config>.yaml)")
    for app in status["applications"]:
        lines.append(f"  {app['name']}: {app['status']}" + (f" - {app['message']}" if app["message"] else ""))
        for d in app["deployments"]:
            replicas = ", ".join(f"{k} {v}" for k, v in sorted(d["replicas"].items())) or "no replicas"
            lines.append(f"    {d['name']:32} {d['status']:10} {replicas}")
            if d["message"]:
                lines.append(f"      {d['message']}")
    if status["problems"]:
        lines.append("")
        lines.append("CANNOT PLACE")
        lines += [f"  {p}" for p in status["problems"]]
    return "\n".join(lines)


def to_json(status: dict[str, Any]) -> str:
    return json.dumps(status, indent=2, default=str)
