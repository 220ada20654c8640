"""A checkpoint's weight files and their sizes, read from its hub's file list or its directory, never
downloaded: what sizes a model whose config.json cannot be used (cluster/hbm_need.py).

The weight files are the ones vLLM's default loader would load from the checkpoint's top directory: the
first of `*.safetensors`, `*.bin`, `*.pt` that has any (vllm/model_executor/model_loader/default_loader.py,
DefaultModelLoader._prepare_weights, load format auto); besides, as it does, not the training state
`*.bin` files (weight_utils.filter_files_not_needed_for_inference), and not a Mistral-format
`consolidated*.safetensors` beside sharded ones (it loads those through the index, which leaves it out).

    Hugging Face  HfApi.model_info(files_metadata=True): every file with its size, one request
    ModelScope    HubApi.get_model_files(recursive=False): the top directory with sizes
                  (modelscope 1.40: modelscope_hub.compat.hub_api.LegacyHubApi.get_model_files, GET
                  /api/v1/models/{Org}/{Name}/repo/files)
"""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

from raystack.models.sources import (
    HUB_ENDPOINT_ENV,
    HUB_LOOKUP_TIMEOUT_S,
    ModelSource,
    check_hub_reachable,
    hub_error,
    hub_endpoint,
)

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")
NOT_WEIGHTS = {"training_args.bin", "optimizer.bin", "optimizer.pt", "scheduler.pt", "scaler.pt"}


def weight_files(sizes: dict[str, int]) -> dict[str, int]:
    """The weight files among a checkpoint's files (repository-relative name -> bytes), by vLLM's rule."""
    top = {name: size for name, size in sizes.items() if "/" not in name and name not in NOT_WEIGHTS}
    for pattern in WEIGHT_PATTERNS:
        found = {name: size for name, size in top.items() if fnmatch(name, pattern)}
        if pattern == "*.safetensors":
            sharded = {n: s for n, s in found.items() if not n.startswith("consolidated")}
            found = sharded or found
        if found:
            return found
    return {}


def hub_file_sizes(src: ModelSource, timeout_s: float = HUB_LOOKUP_TIMEOUT_S) -> dict[str, int]:
    """Every file the hub lists for the model (the top directory at least) with its size in bytes. The hub is
    tried for a connection first, so an unreachable one fails within `timeout_s`. Raises ModelSourceError."""
    check_hub_reachable(src, timeout_s)
    try:
        if src.kind == "hf":
            from huggingface_hub import HfApi

            info = HfApi(endpoint=hub_endpoint("hf")).model_info(src.ref, files_metadata=True, timeout=timeout_s)
            return {s.rfilename: s.size or 0 for s in info.siblings or []}
        from modelscope.hub.api import HubApi

        files = HubApi(endpoint=hub_endpoint("modelscope")).get_model_files(src.ref, revision="master",
                                                                             recursive=False)
        return {f["Path"]: int(f["Size"] or 0) for f in files}
    except Exception as err:  # network, auth, a missing repository: the hub's words reach the user
        raise hub_error(src, f"list the files of {src}", err,
                        f"Check the name, or the hub's address ({HUB_ENDPOINT_ENV[src.kind]}).") from None


def local_file_sizes(path: Path) -> dict[str, int]:
    """The files of a checkpoint directory's top level with their sizes."""
    return {f.name: f.stat().st_size for f in path.iterdir() if f.is_file()} if path.is_dir() else {}
