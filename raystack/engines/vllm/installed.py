"""Whether this node runs vLLM on its NPUs, as `raystack start` tells it: vllm-ascend installed in this
Python, and the vLLM it plugs into. Read from package metadata only: importing either loads torch and
torch-npu, seconds, and fails on a node without CANN.

vllm-ascend's wheel is the distribution `vllm_ascend` (importlib.metadata finds it as "vllm-ascend") and
registers itself with vLLM as the entry point `ascend = vllm_ascend:register` of the group
`vllm.platform_plugins` (vllm-ascend setup.py; vLLM loads that group in vllm/plugins/__init__.py), a second
signal where the distribution is named otherwise. vLLM itself is built for it with
VLLM_TARGET_DEVICE=empty, which vLLM's setup.py marks with the local version "+empty" ("0.23.0+empty" in
vllm-ascend's v0.23.0 image); the node label carries the series, "0.23". vLLM without vllm-ascend (the CPU
build, or PyPI's CUDA wheel) runs no NPU replica: such a node gets no label.
"""

from __future__ import annotations

from importlib.metadata import distributions

from raystack.engines.ascend_env import cann_environment_problem
from raystack.engines.base import Found, Where, version_series

PLUGIN_GROUP, PLUGIN_NAME = "vllm.platform_plugins", "ascend"


def vllm_ascend_version(path: list[str] | None = None) -> str | None:
    """The installed vllm-ascend's version (or of the distribution that registers vLLM's `ascend` platform)."""
    where = {} if path is None else {"path": path}  # importlib.metadata takes no path=None
    found = next(iter(distributions(name="vllm-ascend", **where)), None)
    if found is None:
        found = next((d for d in distributions(**where) for ep in d.entry_points
                      if ep.group == PLUGIN_GROUP and ep.name == PLUGIN_NAME), None)
    return found.version if found is not None else None


def detect(where: Where) -> Found:
    from raystack.engines.vllm.compat import installed_version

    path = list(where.python_path) if where.python_path is not None else None
    plugin = vllm_ascend_version(path)
    if plugin is None:
        return Found(note="no vllm-ascend in this Python")
    vllm = installed_version(path)
    if vllm is None:
        return Found(f"vllm-ascend {plugin}", note=f"vllm-ascend {plugin} is installed but vLLM is not: install the "
                                                   f"vLLM it supports (README, \"On an Ascend NPU cluster\", step 1)")
    # vLLM Ascend runs in the replica's process and its Ray workers: CANN's environment must be in theirs.
    return Found(f"vLLM {vllm} with vllm-ascend {plugin}", version_series(vllm),
                 warning=cann_environment_problem(where.environ, where.ascend_home) or "")
