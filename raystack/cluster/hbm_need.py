"""The HBM each NPU of a replica needs, known before placement, and where that figure came from.

Every `device: npu` backend that loads a model gets one, from the first of these that works:

    hbm_gib in the config          the backend's `hbm_gib:`, when set: the operator's figure wins over any
                                   estimate (a measurement beats a rule), and no hub is asked
    config.json in the cache       `raystack estimate`'s rule for the backend's parallelism, context, dtype and
      (or of the local checkpoint)   engine memory share (estimate.min_hbm_gib)
    config.json from the hub       the same, with just that file fetched into the cache
    checkpoint size on the hub     the sizes of the weight files the hub lists (models/checkpoint_files.py),
      (or on disk, for a local       GPUStack's rule: weights x 1.2 split evenly over tensor x pipeline NPUs,
      checkpoint)                    + 2 GiB on each, within the engine's memory share
                                     (estimate.min_hbm_gib_for_weights); used when config.json is missing
                                     or describes a model the estimate cannot count

Otherwise the need is unknown, and `serve run` and `raystack config check` refuse the backend with why each
source failed and the fix (app.check_deployable): a replica placed without an HBM condition could land on
NPUs too small for it. A hub is asked only after a quick connection test (sources.check_hub_reachable),
so an offline machine learns it at once instead of after the hub clients' retries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from raystack.cluster.estimate import GIB, EstimateError, min_hbm_gib, min_hbm_gib_for_weights
from raystack.config import Backend, Model
from raystack.models import sources
from raystack.models.checkpoint_files import WEIGHT_PATTERNS, hub_file_sizes, local_file_sizes, weight_files

FROM_CONFIG = "hbm_gib in the config"
FROM_CACHED_CONFIG = "config.json in the cache"
FROM_LOCAL_CONFIG = "config.json of the local checkpoint"
FROM_HUB_CONFIG = "config.json from the hub"


@dataclass(frozen=True)
class HBMNeed:
    gib: float | None  # HBM per NPU of one replica; None: unknown
    source: str  # where `gib` came from; when unknown, why no source worked and the fix

    @property
    def known(self) -> bool:
        return self.gib is not None


HBMNeeds = dict[tuple[str, str], HBMNeed]  # (model, backend) -> its need


def hbm_needs(models: list[Model], cache_dir: Path, report: Callable[[str], None] = print,
              timeout_s: float = sources.HUB_LOOKUP_TIMEOUT_S) -> HBMNeeds:
    """The HBM need per NPU of every NPU backend that loads a model, by the sources in the module docstring.
    `report` hears what is fetched; `timeout_s` bounds each hub look-up."""
    needs: HBMNeeds = {}
    for model in models:
        npu = [b for b in model.backends if b.device == "npu" and b.loads_model]
        for backend in npu:
            if backend.hbm_gib is not None:
                needs[model.name, backend.name] = HBMNeed(backend.hbm_gib, FROM_CONFIG)
        estimated = [b for b in npu if b.hbm_gib is None]
        if estimated:
            for backend, need in zip(estimated, _estimated(model.source, estimated, cache_dir, report, timeout_s)):
                needs[model.name, backend.name] = need
    return needs


def unknown_needs(models: list[Model], needs: HBMNeeds) -> list[str]:
    """One line per NPU backend whose need is unknown: why, and the fix."""
    return [f"  {model.name}@{backend.name}: {needs[model.name, backend.name].source}"
            for model in models for backend in model.backends
            if (model.name, backend.name) in needs and not needs[model.name, backend.name].known]


def _estimated(source: str, backends: list[Backend], cache_dir: Path, report: Callable[[str], None],
               timeout_s: float) -> list[HBMNeed]:
    src = sources.parse_source(source)
    tried: list[str] = []  # why each source did not size the model

    config, where = _config_here(source, src, cache_dir, report, tried)
    if config is not None:
        try:
            return _from_config(config, backends, where)
        except EstimateError as err:
            tried.append(f"its {where} cannot be sized ({err})")

    if src.kind == "local":
        sizes, place = local_file_sizes(Path(src.ref)), "on disk"
    elif src.kind in sources.HUB_NAMES:
        place = "on the hub"
        try:
            sizes = hub_file_sizes(src, timeout_s)
        except sources.ModelSourceError as err:
            tried.append(str(err))
            return [HBMNeed(None, _unknown(src, cache_dir, tried))] * len(backends)
        if config is None and "config.json" in sizes:
            try:
                fetched = sources.model_config(source, cache_dir, progress=report)
                return _from_config(fetched, backends, FROM_HUB_CONFIG)
            except (sources.ModelSourceError, EstimateError) as err:
                tried.append(f"its config.json from {sources.HUB_NAMES[src.kind]} did not size it ({err})")
    else:
        sizes, place = {}, "in the cache"

    weights = weight_files(sizes)
    if not weights:
        tried.append(f"no weight files ({', '.join(WEIGHT_PATTERNS)}) {place} to size it by")
        return [HBMNeed(None, _unknown(src, cache_dir, tried))] * len(backends)
    weights_gib = sum(weights.values()) / GIB
    return [HBMNeed(min_hbm_gib_for_weights(weights_gib, b.parallel.tensor, b.parallel.pipeline,
                                            b.spec.memory_fraction(b)),
                    f"checkpoint size {place}: {weights_gib:.3g} GiB of weights")
            for b in backends]


def _config_here(source: str, src: sources.ModelSource, cache_dir: Path, report: Callable[[str], None],
                 tried: list[str]) -> tuple[dict | None, str]:
    """The model's config.json if this machine has it (a local checkpoint, the cache), without asking a hub."""
    if src.kind in sources.HUB_NAMES and sources.locate(source, cache_dir) is None \
            and not sources.cached_config_path(src, cache_dir).is_file():
        tried.append(f"config.json of {src} is not in the cache ({sources.cached_config_path(src, cache_dir)})")
        return None, ""
    where = FROM_LOCAL_CONFIG if src.kind == "local" else FROM_CACHED_CONFIG
    try:
        return sources.model_config(source, cache_dir, progress=report, fetch=False), where
    except sources.ModelSourceError as err:
        tried.append(str(err))
        return None, ""


def _from_config(config: dict, backends: list[Backend], where: str) -> list[HBMNeed]:
    return [HBMNeed(min_hbm_gib(config, b.parallel.tensor, b.parallel.pipeline, b.max_model_len,
                                b.engine_args.get("dtype"), memory_fraction=b.spec.memory_fraction(b)), where)
            for b in backends]


def _unknown(src: sources.ModelSource, cache_dir: Path, tried: list[str]) -> str:
    fix = "set `hbm_gib:` in the backend (the HBM per NPU one replica needs, in GiB)"
    if src.kind in sources.HUB_NAMES:
        fix = (f"run `raystack models prepare {src}` on this node (it downloads the model, config.json with it, "
               f"into the cache), or put the model's config.json at {sources.cached_config_path(src, cache_dir)}, "
               f"or {fix}")
    return (f"the HBM each NPU needs is unknown, so no placement could keep it off NPUs too small for it: "
            f"{'; '.join(t.rstrip('.') for t in tried)}. Fix: {fix}.")
