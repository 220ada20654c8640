"""engine: mindie, MindIE Service (Huawei's inference server) as a supervised `mindieservice_daemon` per
replica, proxied over loopback HTTP.

    settings.py   the backend's `mindie:` block
    engine.py     MindIEEngine: the proxy, health and metrics of a replica
    daemon.py     one daemon: its config.json, environment, readiness and stop
    config.py     MindIE's config.json for one replica
    ranktable.py  the rank table of a replica over several nodes
    node.py       MindIENode: the actor that runs a multi-node replica's daemon on each further node
    installed.py  whether this node runs MindIE, and which (raystack start's node label)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from raystack.engines.base import EngineSpec, Found, NodeSoftware, Placement, PlannedNode, Refusal, RequestKind, Where
from raystack.engines.mindie.settings import ADAPTER_NAME_RULE, MINDIE_NODE_CPUS, MODEL_NAME_RULE, MindIESettings
from raystack.protocol import tool_choice_of

if TYPE_CHECKING:
    from raystack.config import Backend, RouterConfig


def _validate(backend: Backend) -> None:
    if backend.device != "npu":
        raise ValueError("engine: mindie runs on Ascend NPUs only; use device: npu (or engine: vllm on cpu)")
    if backend.engine_args:
        raise ValueError("engine_args are vLLM's; engine: mindie is set up by its mindie: block "
                         "(and mindie.overrides for any config.json key)")
    max_input = backend.mindie.max_input_token_len
    if max_input and backend.max_model_len and max_input > backend.max_model_len:
        raise ValueError(f"mindie.max_input_token_len ({max_input}) exceeds max_model_len ({backend.max_model_len}), "
                         f"MindIE's maxSeqLen: a prompt must leave room to answer")
    prefill = backend.mindie.max_prefill_tokens
    if prefill and not max_input and backend.max_model_len and prefill < backend.max_model_len:
        raise ValueError(f"mindie.max_prefill_tokens ({prefill}) is below max_input_token_len (max_model_len, "
                         f"{backend.max_model_len}); MindIE refuses that: raise it or set max_input_token_len")
    _timeouts_in_range(backend)


# ServerConfig keys MindIE checks in range at start (MindIE-LLM@8b4871a server_config.cpp CheckParam), in seconds.
TIMEOUT_RANGES = {"tokenTimeout": (1, 3600), "e2eTimeout": (1, 65535)}


def _timeouts_in_range(backend: Backend) -> None:
    server = backend.mindie.overrides.get("ServerConfig") or {}
    for key, (least, most) in TIMEOUT_RANGES.items():
        value = server.get(key, least)
        if not isinstance(value, int) or isinstance(value, bool) or not least <= value <= most:
            raise ValueError(f"mindie.overrides.ServerConfig.{key} must be whole seconds in [{least}, {most}] "
                             f"(MindIE refuses to start otherwise); got {value!r}")


def _router_problems(backend: Backend, router: RouterConfig) -> list[str]:
    """A router bound MindIE cannot honour: it ends a request at the earliest of tokenTimeout (at most 3600 s,
    counted from the request's start for a non-streamed answer) and e2eTimeout (at most 65535 s)
    (single_llm_pnd_req_handler.cpp GetTimeoutPoint), with an error. Refused rather than warned: the router
    promises answers up to request_timeout_s. A backend whose overrides set the key has chosen MindIE's bound."""
    from raystack.engines.mindie.config import MAX_E2E_TIMEOUT_S, MAX_TOKEN_TIMEOUT_S

    bound = router.request_timeout_s
    chosen = backend.mindie.overrides.get("ServerConfig") or {}
    if bound > MAX_E2E_TIMEOUT_S and "e2eTimeout" not in chosen:
        return [f"router.request_timeout_s ({bound:g} s) is longer than MindIE lets any answer run: its "
                f"ServerConfig.e2eTimeout is at most {MAX_E2E_TIMEOUT_S} s (and tokenTimeout, which bounds a "
                f"non-streamed answer, at most {MAX_TOKEN_TIMEOUT_S} s), after which it ends the answer with an "
                f"error. Lower router.request_timeout_s to {MAX_TOKEN_TIMEOUT_S} (any answer) or {MAX_E2E_TIMEOUT_S} "
                f"(streamed answers), or accept MindIE's bounds with mindie.overrides: {{ServerConfig: "
                f"{{tokenTimeout: {MAX_TOKEN_TIMEOUT_S}, e2eTimeout: {MAX_E2E_TIMEOUT_S}}}}}"]
    if bound > MAX_TOKEN_TIMEOUT_S and "tokenTimeout" not in chosen:
        return [f"router.request_timeout_s ({bound:g} s) is longer than MindIE lets a non-streamed answer run: its "
                f"ServerConfig.tokenTimeout, at most {MAX_TOKEN_TIMEOUT_S} s, counts from the request's start when "
                f"the answer is not streamed, and MindIE then ends it with an error. Lower router.request_timeout_s "
                f"to {MAX_TOKEN_TIMEOUT_S}, or accept that bound for non-streamed answers (streamed ones run up to "
                f"the router's) with mindie.overrides: {{ServerConfig: {{tokenTimeout: {MAX_TOKEN_TIMEOUT_S}}}}}"]
    return []


def _check_model_name(name: str) -> None:
    if not MODEL_NAME_RULE.fullmatch(name):
        raise ValueError(f"engine: mindie serves the model as ModelConfig.modelName, and MindIE refuses {name!r}: "
                         f"1 to 256 of A-Z a-z 0-9 _ . -, beginning and ending with a letter or digit")


def _check_adapter_name(name: str) -> None:
    if not ADAPTER_NAME_RULE.fullmatch(name):
        raise ValueError(f"engine: mindie serves adapter {name!r} as a LoraModules name, and MindIE takes 1 to 256 "
                         f"of A-Z a-z 0-9 _ - only; rename it")


def _placement(backend: Backend) -> Placement:
    """A MindIE replica holds its node's NPUs itself (its daemon is one process over them): tensor NPUs per
    node, on `pipeline` nodes. Beyond one node, each further node is a bundle of its own where a
    MindIENode actor runs that node's daemon; STRICT_SPREAD, since two daemons of one replica cannot
    share a host."""
    per_node = backend.parallel.tensor
    nodes = backend.parallel.pipeline
    if nodes == 1:
        return Placement(replica={"NPU": per_node})
    return Placement(
        replica={"NPU": per_node},
        bundles=({"NPU": per_node},) + tuple({"CPU": MINDIE_NODE_CPUS, "NPU": per_node} for _ in range(nodes - 1)),
        strategy="STRICT_SPREAD",
        node_bundles=tuple(range(1, nodes)),
    )


PLANNED_PORTS = (0, 0, 0, 0)  # in `raystack plan`: a replica takes free ports of its node when it starts


def _plan(model_name: str, model_path: Path, backend: Backend, nodes: list[PlannedNode]) -> dict[str, Any]:
    """The config.json and environment of the replica's first daemon (the master, on a replica over several
    nodes, with the rank table all its daemons share)."""
    import os

    from raystack.engines.mindie.config import MindIEConfigError, render_config
    from raystack.engines.mindie.daemon import MindIEStartError, load_default_config, ranktable_env
    from raystack.engines.mindie.engine import plan_for
    from raystack.engines.mindie.environment import multi_node_defaults, own_env
    from raystack.engines.mindie.ranktable import NodeDevices, render_ranktable

    settings = backend.mindie
    install = settings.install(dict(os.environ))
    multi = backend.parallel.pipeline > 1
    first = nodes[0]
    daemon = plan_for(model_name, model_path, backend, list(first.npu_ids[:backend.parallel.tensor]),
                      first.ip if multi else "127.0.0.1", PLANNED_PORTS)
    try:
        default, shipped = load_default_config(install), f"{install}/conf/config.json"
    except MindIEStartError:  # MindIE is not installed where the plan is made: raystack's keys only
        default = {"ServerConfig": {}, "BackendConfig": {"ModelDeployConfig": {"ModelConfig": [{}]},
                                                         "ScheduleConfig": {}}}
        shipped = f"not found here ({install}): raystack's keys and overrides only"
    try:
        config = render_config(default, daemon, settings)
    except MindIEConfigError as err:
        config = {"error": str(err)}
    env = {**(multi_node_defaults(first.chip_family) if multi else {}), **backend.env,
           **own_env(settings, install, Path("<the replica's private directory>/config.json"))}
    planned: dict[str, Any] = {"set_env_scripts": settings.scripts(), "env": env, "shipped_config": shipped,
                               "config.json": config, "ports": "0: a free port of the node, taken when the replica starts"}
    if multi:
        table = render_ranktable([NodeDevices(n.ip, tuple((i, f"<hccn_tool -i {i} -ip -g on {n.ip}>")
                                                          for i in n.npu_ids[:backend.parallel.tensor]))
                                  for n in nodes[:backend.parallel.pipeline]])
        planned["env"].update(ranktable_env(table, Path("<the replica's private directory>/ranktable.json"), daemon))
        planned["rank_table"] = table
    return planned


def _refuses(kind: RequestKind, body: dict[str, Any], backend: Backend) -> Refusal | None:
    """What MindIE's OpenAI endpoint (openAiSupport: vllm) does not honour, from MindIE-LLM@8b4871ad
    src/server/endpoint/single_req_infer_interface/single_req_vllm_openai_infer_interface.cpp: tools with
    tool_choice auto or none go to the chat template and calls come back parsed (the model's tool-call
    parser, docs/zh/user_guide/feature/function_call.md); but `required` is treated as auto and a named
    function only narrows the tools the template shows (FilterToolChoice): no call is forced. response_format
    json_object / json_schema are constrained with xgrammar (infer_param.cpp AssignResponseFormat), so they
    pass."""
    if tool_choice_of(body) in ("required", "named"):
        return Refusal("tool_choice", "MindIE does not force a tool call (tool_choice `required` or a named "
                                      "function only narrows the tools its chat template shows); send "
                                      "tool_choice auto, or use a vLLM backend with a tool parser")
    return None


def _detect(where: Where) -> Found:
    from raystack.engines.mindie.installed import detect

    return detect(where)


# The MindIE series whose config.json layout (ServerConfig, BackendConfig.ModelDeployConfig.ModelConfig,
# ScheduleConfig) config.py writes: MindIE 2.0 to 2.3 and the open-source 3.0.
NODE_SOFTWARE = NodeSoftware(
    label="raystack.io/engine-mindie",
    series=("2.0", "2.1", "2.2", "2.3", "3.0"),
    planned="2.3",
    name="MindIE",
    install="start a node with `raystack start` in MindIE's image, or where MindIE is installed under the "
            "Ascend home (--ascend-home, default /usr/local/Ascend; README, \"On an Ascend NPU cluster\")",
    detect=_detect,
)

ENGINE = EngineSpec(
    name="mindie",
    engine_class="raystack.engines.mindie.engine:MindIEEngine",
    settings=MindIESettings,
    serves_adapters=True,
    check_adapter_name=_check_adapter_name,
    devices=("npu",),
    validate=_validate,
    check_model_name=_check_model_name,
    refuses=_refuses,
    running_limit=lambda backend: backend.mindie.max_batch_size,  # its scheduler's sequences at once
    router_problems=_router_problems,
    placement=_placement,
    memory_fraction=lambda backend: backend.mindie.npu_memory_fraction,
    plan=_plan,
    node_software=NODE_SOFTWARE,
)
