"""The backend's `mindie:` block: where MindIE Service is installed and the limits its config.json gets."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from raystack.engines.ascend_env import DEFAULT_ASCEND_HOME, NNAL_ATB_SCRIPT, toolkit_script

DAEMON = "bin/mindieservice_daemon"  # under the installation (install() below)
# A MindIE replica on several nodes runs a MindIENode actor (one process, mostly waiting) on each further node.
MINDIE_NODE_CPUS = 1
# MindIE's rule for ModelConfig.modelName (MindIE-LLM src/config_manager/model_deploy_config.cpp: 1-256 of
# [a-zA-Z0-9_.-], first and last a letter or digit); the daemon refuses any other name at start.
MODEL_NAME_RULE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,254}[A-Za-z0-9])?")
# Its rule for a LoRA adapter's name (docs/zh/user_guide/feature/multi_loRA.md; the load endpoint's
# ^[a-zA-Z0-9_-]{1,256}$ in http_handler.cpp): no dot, unlike a model's.
ADAPTER_NAME_RULE = re.compile(r"[A-Za-z0-9_-]{1,256}")


class MindIESettings(BaseModel):
    """engine: mindie, MindIE Service run as a supervised mindieservice_daemon per replica (engine.py).
    The replica writes config.json from the installation's shipped one; `overrides` are merged last."""

    model_config = ConfigDict(extra="forbid")

    ascend_home: str = Field(
        DEFAULT_ASCEND_HOME, description="where CANN, NNAL (ATB), atb-models and MindIE are installed (GPUStack's "
        "CANN_HOME); the default scripts and installation are found under it"
    )
    set_env_scripts: list[str] | None = Field(
        None, min_length=1, description="scripts sourced, in order, before the daemon starts, each `PATH [ARGS]` "
        "(default, as GPUStack: ascend_home's ascend-toolkit/set_env.sh (cann/set_env.sh from CANN 8.5), "
        "nnal/atb/set_env.sh, atb-models/set_env.sh, mindie/set_env.sh)"
    )
    install_path: str | None = Field(
        None, description="MindIE Service installation holding bin/mindieservice_daemon and conf/config.json "
        "(default: $MIES_INSTALL_PATH, else ascend_home's mindie/latest/mindie-service)"
    )
    max_input_token_len: int | None = Field(
        None, ge=1, description="longest prompt in tokens (maxInputTokenLen; default: max_model_len)"
    )
    max_batch_size: int = Field(200, ge=1, description="sequences decoded together (maxBatchSize)")
    max_prefill_tokens: int | None = Field(
        None, ge=1, description="tokens of one prefill batch (maxPrefillTokens; default: max(8192, max_input_token_len))"
    )
    cache_block_size: int = Field(128, ge=1, description="tokens per KV-cache block (cacheBlockSize)")
    npu_memory_fraction: float = Field(
        0.9, gt=0, le=1, description="share of each NPU's memory MindIE may use (NPU_MEMORY_FRACTION)"
    )
    startup_timeout_s: float = Field(
        1800, gt=0, description="longest wait for the daemon to load the model and open its port"
    )
    model_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per model type, what MindIE's LLM layer reads from "
        "ModelConfig[0].models (MindIE-LLM router.py get_llm_config_validators): enable_reasoning (thinking parsed "
        "into reasoning_content, docs/zh/user_guide/feature/enable_reasoning.md), tool_call_options.tool_call_parser, "
        "chat_template; e.g. {qwen3: {enable_reasoning: true}}. The key is the weights' model_type (MindIE's name "
        "for DeepSeek-R1 is deepseekv2)"
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="merged into config.json last, e.g. {BackendConfig: {ScheduleConfig: "
        "{maxIterTimes: 1024}}}"
    )

    @model_validator(mode="after")
    def _model_options_of_their_types(self) -> MindIESettings:
        # MindIE-LLM router.py validates these three so at start; refused here instead of a daemon that exits
        for model_type, options in self.model_options.items():
            where = f"model_options.{model_type}"
            if not isinstance(options.get("enable_reasoning", False), bool):
                raise ValueError(f"{where}.enable_reasoning must be true or false")
            parser = (options.get("tool_call_options") or {}).get("tool_call_parser")
            if parser is not None and not isinstance(parser, str):
                raise ValueError(f"{where}.tool_call_options.tool_call_parser must be a parser name")
            if not isinstance(options.get("chat_template", ""), str):
                raise ValueError(f"{where}.chat_template must be the path of a template file")
        return self

    @model_validator(mode="after")
    def _prefill_holds_a_prompt(self) -> MindIESettings:
        # MindIE refuses it at start: "The value of maxPrefillTokens should not be less than maxInputTokenLen"
        # (MindIE-LLM src/config_manager/config_manager_impl.cpp).
        if self.max_prefill_tokens and self.max_input_token_len and self.max_prefill_tokens < self.max_input_token_len:
            raise ValueError(f"max_prefill_tokens ({self.max_prefill_tokens}) is below max_input_token_len "
                             f"({self.max_input_token_len}); MindIE refuses that: raise max_prefill_tokens")
        return self

    def scripts(self) -> list[str]:
        if self.set_env_scripts is not None:
            return list(self.set_env_scripts)
        home = Path(self.ascend_home)
        return [str(toolkit_script(home))] + [str(home / p) for p in (NNAL_ATB_SCRIPT, "atb-models/set_env.sh",
                                                                       "mindie/set_env.sh")]

    def install(self, environ: dict[str, str]) -> Path:
        return Path(self.install_path or environ.get("MIES_INSTALL_PATH")
                    or Path(self.ascend_home) / "mindie/latest/mindie-service")
