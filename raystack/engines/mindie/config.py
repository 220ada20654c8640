"""MindIE Service's config.json for one replica.

Starts from the config.json the MindIE installation ships (`$MIES_INSTALL_PATH/conf/config.json`), so
every key of that release keeps its default; sets the keys raystack owns; then merges the deploy
config's `overrides` last (objects merge key by key, anything else is replaced).

Keys raystack owns:
- ServerConfig: where the three planes listen. Only the replica, on the same host, talks to the daemon,
  so all of them are on loopback, as one listener (one IP and one port: MindIE-LLM http_server.cpp
  merges equal addresses). On a multi-node replica MIES_CONTAINER_IP, which MindIE needs to find this
  node in the rank table (docs/zh/user_guide/user_manual/environment_variable.md), also moves the
  inference plane to the node's IP (server_config.cpp); the management plane (/stopService, /health,
  /info) and the metrics (which listen on managementIpAddress: http_server.cpp) then stay on loopback at
  a port of their own. An equal port with another IP would put the management routes on the node-IP
  listener too. `httpsEnabled: false` and every TLS switch off;
- BackendConfig: `npuDeviceIds` (the NPUs Ray assigned to this replica on this node),
  `multiNodesInferEnabled`, ModelDeployConfig `maxSeqLen` / `maxInputTokenLen`, and the first
  ModelConfig's `modelName`, `modelWeightPath`, `worldSize` (this node's NPUs: MindIE's convention, and
  what it derives from the rank table on a multi-node replica), and its `models` from the backend's
  `mindie.model_options` (per model type: enable_reasoning, tool_call_options, chat_template);
- ScheduleConfig: `maxBatchSize`, `maxPrefillTokens`, `cacheBlockSize`, and `maxIterTimes`, the most tokens
  MindIE generates per request (output = min(maxIterTimes, max_tokens, maxSeqLen - prompt): MindIE-LLM
  docs/zh/user_guide/user_manual/service_parameter_configuration.md). The shipped 512 would cut every
  answer there; like GPUStack (ascend_mindie.py sets maxIterTimes = maxSeqLen) it follows max_model_len;
- ServerConfig `tokenTimeout` and `e2eTimeout` (seconds): MindIE ends a request at the earliest of the
  client's timeout, tokenTimeout and e2eTimeout (MindIE-LLM@8b4871a src/server/endpoint/
  single_llm_req_handler/single_llm_pnd_req_handler.cpp GetTimeoutPoint), and for a non-streamed answer
  the token deadline runs from the request's start (same file, the wait loop), so tokenTimeout bounds a
  whole non-streamed answer. The shipped 600/600 (src/server/conf/config.json) would cut answers the
  router still allows: both follow the router's bound instead, within MindIE's ranges (server_config.cpp
  CheckParam: tokenTimeout [1, 3600], e2eTimeout [1, 65535]; docs/zh/user_guide/user_manual/
  service_parameter_configuration.md); see mindie_timeouts;
- BackendConfig `multiNodesInferPort`: the master's port for the other nodes of a multi-node replica, one
  free port per replica so two replicas on a node never collide (MindIE also refuses a config whose
  inference port equals it, even on one node: config_manager_impl.cpp).
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raystack.engines.mindie.settings import MindIESettings

CONFIG_MODE = 0o640  # MindIE refuses a config.json others may write or read
LOOPBACK = "127.0.0.1"


# MindIE's ranges for ServerConfig's timeouts, in seconds (MindIE-LLM@8b4871a server_config.cpp CheckParam).
MAX_TOKEN_TIMEOUT_S = 3600
MAX_E2E_TIMEOUT_S = 65535


def mindie_timeouts(longest_answer_s: float) -> tuple[int, int]:
    """(tokenTimeout, e2eTimeout) that let an answer run `longest_answer_s`, as far as MindIE's ranges allow."""
    bound = max(1, math.ceil(longest_answer_s))
    return min(MAX_TOKEN_TIMEOUT_S, bound), min(MAX_E2E_TIMEOUT_S, bound)


class MindIEConfigError(ValueError):
    """A default config.json that does not have the shape MindIE documents; says what is missing."""


@dataclass(frozen=True)
class MindIEPlan:
    """What one replica runs: its model, its NPUs on this node, its ports, and the limits."""

    model_name: str
    weight_path: str
    npu_ids: list[int]
    port: int
    max_seq_len: int
    max_input_token_len: int
    max_batch_size: int
    max_prefill_tokens: int
    max_iter_times: int
    multi_nodes_infer_port: int
    cache_block_size: int = 128
    token_timeout: int = 3600  # ServerConfig.tokenTimeout (mindie_timeouts); 3600: the router's default bound
    e2e_timeout: int = 3600  # ServerConfig.e2eTimeout
    multi_node: bool = False
    ip: str = LOOPBACK  # the inference plane's: the node's IP on a multi-node replica
    master_port: int = 0  # multi-node: the master's port for the ranks' rendezvous (MASTER_PORT)
    management_port: int = 0  # management and metrics, on loopback; 0: the inference port (one listener)
    adapters: tuple[tuple[str, str, int], ...] = ()  # LoRA adapters: (name, directory, rank)

    @property
    def management_url(self) -> str:
        return f"http://{LOOPBACK}:{self.management_port or self.port}"


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` applied: nested objects merge key by key; any other value replaces."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _section(config: dict[str, Any], *path: str) -> dict[str, Any]:
    node: Any = config
    for i, key in enumerate(path):
        node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            raise MindIEConfigError(
                f"the default config.json has no {'.'.join(path[:i + 1])} object; point MIES_INSTALL_PATH at a "
                f"MindIE Service installation whose conf/config.json is intact"
            )
    return node


def render_config(default: dict[str, Any], plan: MindIEPlan, settings: MindIESettings | None = None) -> dict[str, Any]:
    """config.json for `plan`, with the backend's `mindie:` block's model_options and overrides."""
    settings = settings or MindIESettings()
    config = copy.deepcopy(default)
    server = _section(config, "ServerConfig")
    server.update({
        "ipAddress": plan.ip, "managementIpAddress": LOOPBACK,
        "port": plan.port, "managementPort": plan.management_port or plan.port,
        "metricsPort": plan.management_port or plan.port,
        "allowAllZeroIpListening": False, "httpsEnabled": False, "interCommTLSEnabled": False,
        "openAiSupport": "vllm",
        "tokenTimeout": plan.token_timeout, "e2eTimeout": plan.e2e_timeout,
    })
    backend = _section(config, "BackendConfig")
    backend.update({
        "npuDeviceIds": [list(plan.npu_ids)],
        "multiNodesInferEnabled": plan.multi_node,
        "multiNodesInferPort": plan.multi_nodes_infer_port,
        "interNodeTLSEnabled": False,
    })
    deploy = _section(config, "BackendConfig", "ModelDeployConfig")
    deploy.update({"maxSeqLen": plan.max_seq_len, "maxInputTokenLen": plan.max_input_token_len})
    models = deploy.get("ModelConfig")
    if not isinstance(models, list) or not models or not isinstance(models[0], dict):
        raise MindIEConfigError("the default config.json has no BackendConfig.ModelDeployConfig.ModelConfig list")
    models[0].update({
        "modelName": plan.model_name,
        "modelWeightPath": plan.weight_path,
        "worldSize": len(plan.npu_ids),
    })
    if settings.model_options:
        models[0]["models"] = deep_merge(models[0].get("models") or {}, settings.model_options)
    if plan.adapters:
        # MindIE-LLM docs/zh/user_guide/feature/multi_loRA.md and model_deploy_config.cpp: LoraModules beside
        # ModelConfig, each adapter's baseModelName a ModelConfig modelName (else MindIE ignores it with a
        # warning); maxLoras and maxLoraRank sized for them (GPUStack's MindIE backend writes the same keys).
        deploy["LoraModules"] = [{"name": name, "path": path, "baseModelName": plan.model_name}
                                 for name, path, _ in plan.adapters]
        deploy["maxLoras"] = len(plan.adapters)
        deploy["maxLoraRank"] = max(rank for _, _, rank in plan.adapters)
    del models[1:]  # one model per replica
    schedule = _section(config, "BackendConfig", "ScheduleConfig")
    schedule.update({
        "maxBatchSize": plan.max_batch_size,
        "maxPrefillTokens": plan.max_prefill_tokens,
        "maxIterTimes": plan.max_iter_times,
        "cacheBlockSize": plan.cache_block_size,
    })
    return deep_merge(config, settings.overrides)


def write_config(config: dict[str, Any], path: Path) -> None:
    """Write atomically with mode 640, so MindIE never reads a half-written or too-open file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(config, f, indent=4)
        os.chmod(tmp, CONFIG_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
