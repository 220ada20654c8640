"""How many Ascend NPUs a model needs: weights, KV cache and overhead from its config.json.

`raystack estimate MODEL` prints it; a deploy config's `parallelism: auto` uses it. The rule is
GPUStack's vLLM resource-fit rule (weights x 1.2 + 2 GiB must fit in the sum of HBM x 0.9 of the
devices, whose count divides the attention heads), extended with the KV cache of one full-length
sequence and with the 2 GiB counted per NPU (each NPU runs its own worker, runtime context and graphs):

    weights   = embedding params x dtype bytes + other params x weight bits / 8
    kv_cache  = kv bytes per token x max_model_len x (KV copies across tensor-parallel ranks)
    overhead  = 0.2 x weights + 2 GiB x NPUs
    fits on NPUs = TP x PP  <=>  weights + kv_cache + overhead <= NPUs x HBM x memory fraction

TP is the smallest power of two (1, 2, 4, 8, 16, at most one node's NPUs: TP all-reduces every layer
and stays inside a node) that vLLM accepts for the model's heads and fits. When a node at the largest
such TP is not enough, pipeline stages (usually one per node) are added until it fits. The memory fraction is
the engine's (EngineSpec.memory_fraction: vLLM's gpu_memory_utilization, MindIE's npu_memory_fraction).

An estimate, not a measurement: vLLM profiles the real peak at start-up. Everything that makes one
rough is said in `SizeEstimate.notes`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

from raystack.cluster.chips import A2, MODEL_HBM_GIB, NOMINAL, Nominal, family_of, nominal, parse_chip
from raystack.models.shape import (
    ModelShapeError,
    count_parameters,
    embedding_parameters,
    kv_cache_bytes_per_token,
    kv_copies,
    language_config,
    model_max_len,
    quantized_bits,
    rope_scaling,
    rope_type,
    serving_dtype,
    shape,
    tensor_parallel_options,
)
from raystack.models.sources import model_config

logger = logging.getLogger(__name__)

GIB = 1024**3
WEIGHT_MARGIN = 0.2  # GPUStack's x1.2: activations, sampler and allocator slack, proportional to weights
OVERHEAD_PER_NPU_GIB = 2.0  # GPUStack's +2 GiB (graph capture, runtime), counted on every NPU here
DEFAULT_NPU_TYPE = A2


class EstimateError(ValueError):
    """A config or NPU type the estimate cannot work with; the message names what and the fix."""


@dataclass(frozen=True)
class SizeEstimate:
    model: str
    params_b: float  # all parameters (every expert of a MoE), billions
    dtype: str  # the serving dtype: unquantized weights, activations and KV cache
    dtype_bytes: int
    weight_bits: float  # of the non-embedding weights: 16 unless quantized
    weights_gib: float
    kv_bytes_per_token: int  # one copy; see kv_cache_gib for the copies TP makes
    kv_cache_gib: float  # one max_model_len sequence, all NPUs of a replica
    overhead_gib: float  # WEIGHT_MARGIN x weights + OVERHEAD_PER_NPU_GIB x NPUs
    required_gib: float  # weights + kv_cache + overhead, all NPUs of a replica
    npu_type: str
    hbm_gib: float  # per NPU
    gpu_memory_utilization: float
    npus_per_node: int
    max_model_len: int
    tensor_parallel: int
    pipeline_parallel: int
    tp_options: tuple[int, ...]  # tensor-parallel sizes vLLM accepts for this model, up to one node
    notes: tuple[str, ...]

    @property
    def npus_per_replica(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    @property
    def nodes_per_replica(self) -> int:
        return math.ceil(self.npus_per_replica / self.npus_per_node)

    @property
    def usable_gib(self) -> float:
        """What vLLM may use on one NPU."""
        return self.hbm_gib * self.gpu_memory_utilization

    @property
    def per_npu_gib(self) -> float:
        return self.required_gib / self.npus_per_replica

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens of KV cache (over all concurrent sequences) that the leftover memory holds, roughly."""
        free = self.npus_per_replica * self.usable_gib - (self.required_gib - self.kv_cache_gib)
        per_token = self.kv_cache_gib * GIB / self.max_model_len
        return max(0, int(free * GIB / per_token)) if per_token else 0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(npus_per_replica=self.npus_per_replica, nodes_per_replica=self.nodes_per_replica,
                 kv_capacity_tokens=self.kv_capacity_tokens)
        return d


def npu_spec(npu_type: str) -> Nominal:
    """The chip an NPU type names, as chips.nominal sizes it; case, white space and the `Ascend` prefix do not
    matter."""
    found = nominal(npu_type)
    if found:
        return found
    raise EstimateError(
        f"unknown NPU type {npu_type!r}; known types: {_known_types()}. For another chip give its HBM per NPU "
        f"explicitly (--hbm-gib, as `npu-smi info` shows it)"
    )


def _known_types() -> str:
    """Each family chips.NOMINAL sizes, with its models whose size differs from the family's; the others by
    example."""
    listed, examples = [], []
    for family, usual in NOMINAL.items():
        models = [m for m in MODEL_HBM_GIB if parse_chip(m).family == family and not family_of(m)]
        listed.append(f"{usual.chip} ({usual.hbm_gib:g} GiB)")
        listed += [f"{m} ({MODEL_HBM_GIB[m]:g} GiB)" for m in models if MODEL_HBM_GIB[m] != usual.hbm_gib]
        examples += [m for m in models if MODEL_HBM_GIB[m] == usual.hbm_gib][:1]
    return f"{', '.join(listed)}, and the other models of these families at their family's size (e.g. " \
           f"{', '.join(examples)})"


def estimate(
    config: dict[str, Any],
    npu_type: str | None = DEFAULT_NPU_TYPE,
    max_model_len: int | None = None,
    hbm_gib: float | None = None,
    npus_per_node: int | None = None,
    name: str | None = None,
    dtype: str | None = None,
    *,
    gpu_memory_utilization: float,
) -> SizeEstimate:
    """Size a model (its config.json as a dict) for one NPU type; see the module docstring for the rule.

    npu_type: a family or model chips.nominal knows (Ascend910B, 910B4, a3, ...); any name when hbm_gib is given;
    None: Ascend910B.
    max_model_len: the context to size the KV cache for; default: the model's (as vLLM derives it).
    npus_per_node: caps TP (default: per NPU type, 8; 16 on A3).
    dtype: the engine's dtype argument (auto, bfloat16, float16, float32); default auto.
    gpu_memory_utilization: the share of each NPU's HBM the engine takes (EngineSpec.memory_fraction).
    """
    notes: list[str] = []
    cfg = language_config(config)
    if "_nested_in" in cfg:
        notes.append(f"multimodal config: only the language model ({cfg['_nested_in']}) is counted")
    try:
        s = shape(cfg)
        dtype_name, dtype_bytes = serving_dtype(cfg, dtype, notes)
    except ModelShapeError as err:
        raise EstimateError(str(err)) from None
    model = name or str(config.get("_name_or_path") or cfg.get("_name_or_path") or "model")

    npu_type = npu_type or DEFAULT_NPU_TYPE
    if hbm_gib is not None:
        if hbm_gib <= 0:
            raise EstimateError(f"hbm_gib must be positive, got {hbm_gib}")
        known = nominal(npu_type)
        spec = replace(known, hbm_gib=hbm_gib) if known else Nominal(npu_type, hbm_gib, 8)  # 8 NPUs: most servers'
        notes.append(f"HBM per NPU given explicitly: {hbm_gib:g} GiB")
    else:
        spec = npu_spec(npu_type)
    npu_type = spec.chip
    if spec.note:
        notes.append(spec.note)
    per_node = npus_per_node or spec.npus_per_node
    if per_node < 1:
        raise EstimateError(f"npus_per_node must be at least 1, got {per_node}")
    if not 0 < gpu_memory_utilization <= 1:
        raise EstimateError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")

    default_len = model_max_len(cfg)
    rope = rope_scaling(cfg)
    if max_model_len is None:
        max_model_len = default_len
        if rope:
            notes.append(
                f"config enables {rope_type(rope)} RoPE scaling; sized for the model's default context "
                f"{default_len}; pass max_model_len to size for the context you serve"
            )
    elif max_model_len < 1:
        raise EstimateError(f"max_model_len must be positive, got {max_model_len}")
    elif max_model_len > default_len:
        notes.append(
            f"max_model_len {max_model_len} exceeds the model's {default_len}: vLLM refuses it unless "
            f"VLLM_ALLOW_LONG_MAX_MODEL_LEN=1"
        )

    params, weight_bits, weights_gib = _weights(cfg, dtype_bytes, notes)
    kv_per_token = kv_cache_bytes_per_token(cfg, dtype_bytes)
    kv_one_copy_gib = kv_per_token * max_model_len / GIB

    if s.experts:
        notes.append(
            f"MoE ({s.experts} experts per MoE layer): every expert is counted, the estimate is rough "
            f"(expert and shared-expert layouts differ between architectures)"
        )
    if s.mla:
        notes.append("MLA attention: the compressed KV cache is stored whole on every tensor-parallel rank")
    if cfg.get("num_nextn_predict_layers"):
        notes.append("multi-token-prediction (MTP) layers are not counted: they load only for speculative decoding")
    if "sliding_attention" in (cfg.get("layer_types") or []):
        notes.append("sliding-window layers are counted at full length: the KV cache is overestimated")
    if s.model_type and not (s.model_type.startswith(("llama", "qwen", "mistral", "mixtral", "deepseek"))):
        notes.append(f"model_type {s.model_type}: counted as a Llama-style decoder, the estimate is rough")

    options = tensor_parallel_options(cfg, max_tp=per_node)
    if not options:
        raise EstimateError(f"no tensor-parallel size fits {s.heads} attention heads and {s.kv_heads} KV heads")
    usable = spec.hbm_gib * gpu_memory_utilization
    budget = usable - OVERHEAD_PER_NPU_GIB  # what each NPU has for weights, margin and KV cache
    if budget <= 0:
        raise EstimateError(
            f"{spec.hbm_gib:g} GiB HBM x {gpu_memory_utilization} leaves nothing after the "
            f"{OVERHEAD_PER_NPU_GIB:g} GiB per-NPU overhead"
        )

    def need(tp: int) -> float:  # weights + margin + KV cache, for all NPUs of a replica
        return weights_gib * (1 + WEIGHT_MARGIN) + kv_one_copy_gib * kv_copies(s, tp)

    tp, pp = _plan(need, budget, options, s.layers)
    if tp is None:
        raise EstimateError(
            f"{model} does not fit even with one pipeline stage per layer ({s.layers}) at tensor parallel "
            f"{options[-1]} on {npu_type}: lower max_model_len or use a quantized checkpoint"
        )
    if pp > 1:
        notes.append(
            f"needs pipeline parallel: {pp} stages of TP {tp}; stages are sized evenly here, but the "
            f"first and last also hold the embeddings and LM head"
        )
    npus = tp * pp
    kv_gib = kv_one_copy_gib * kv_copies(s, tp)
    overhead = weights_gib * WEIGHT_MARGIN + OVERHEAD_PER_NPU_GIB * npus
    return SizeEstimate(
        model=model, params_b=params / 1e9, dtype=dtype_name, dtype_bytes=dtype_bytes, weight_bits=weight_bits,
        weights_gib=weights_gib, kv_bytes_per_token=kv_per_token, kv_cache_gib=kv_gib, overhead_gib=overhead,
        required_gib=weights_gib + kv_gib + overhead,
        npu_type=npu_type, hbm_gib=float(spec.hbm_gib), gpu_memory_utilization=gpu_memory_utilization,
        npus_per_node=per_node, max_model_len=max_model_len, tensor_parallel=tp, pipeline_parallel=pp,
        tp_options=options, notes=tuple(notes),
    )


def _weights(cfg: dict[str, Any], dtype_bytes: int, notes: list[str]) -> tuple[int, float, float]:
    """(parameters, bits per non-embedding weight, GiB of weights)."""
    weight_bits = quantized_bits(cfg, dtype_bytes, notes)
    params = count_parameters(cfg)
    embed = embedding_parameters(cfg)
    return params, weight_bits, (embed * dtype_bytes + (params - embed) * weight_bits / 8) / GIB


def min_hbm_gib(config: dict[str, Any], tensor: int, pipeline: int, max_model_len: int | None = None,
                dtype: str | None = None, *, memory_fraction: float) -> float:
    """The HBM each NPU of a tensor x pipeline replica needs, by estimate()'s rule: its share of the weights
    x (1 + WEIGHT_MARGIN) and of one max_model_len sequence's KV cache, plus OVERHEAD_PER_NPU_GIB, all
    within `memory_fraction` of the NPU's HBM (vLLM's gpu_memory_utilization, MindIE's NPU_MEMORY_FRACTION)."""
    cfg = language_config(config)
    try:
        s = shape(cfg)
        _, dtype_bytes = serving_dtype(cfg, dtype, [])
    except ModelShapeError as err:
        raise EstimateError(str(err)) from None
    _, _, weights_gib = _weights(cfg, dtype_bytes, [])
    kv_gib = kv_cache_bytes_per_token(cfg, dtype_bytes) * (max_model_len or model_max_len(cfg)) / GIB
    return _per_npu(weights_gib * (1 + WEIGHT_MARGIN) + kv_gib * kv_copies(s, tensor), tensor * pipeline,
                    memory_fraction)


def min_hbm_gib_for_weights(weights_gib: float, tensor: int, pipeline: int, memory_fraction: float) -> float:
    """The HBM each NPU of a tensor x pipeline replica needs when only the checkpoint's size is known (no
    config.json to read the KV cache from): GPUStack's rule, weights x (1 + WEIGHT_MARGIN) split evenly over
    the NPUs, plus OVERHEAD_PER_NPU_GIB on each, within `memory_fraction` of its HBM. The KV cache is what
    the engine makes of the rest of that share."""
    return _per_npu(weights_gib * (1 + WEIGHT_MARGIN), tensor * pipeline, memory_fraction)


def _per_npu(need_gib: float, npus: int, memory_fraction: float) -> float:
    """HBM per NPU for `need_gib` over all NPUs of a replica: an even share plus the per-NPU overhead, within
    the engine's memory fraction."""
    return (need_gib / npus + OVERHEAD_PER_NPU_GIB) / memory_fraction


def _plan(
    need: Callable[[int], float], budget: float, options: tuple[int, ...], layers: int
) -> tuple[int | None, int]:
    """The smallest TP that fits; else the largest TP with the fewest pipeline stages that fit."""
    for tp in options:
        if need(tp) <= tp * budget:
            return tp, 1
    tp = options[-1]
    for pp in range(2, layers + 1):
        if need(tp) <= tp * pp * budget:
            return tp, pp
    return None, 0


def format_estimate(e: SizeEstimate) -> str:
    """Human-readable lines for `raystack estimate`."""
    weights = e.dtype if e.weight_bits == 8 * e.dtype_bytes else f"{e.weight_bits:g}-bit, {e.dtype} embeddings"
    kib = e.kv_bytes_per_token / 1024
    nodes = f" on {e.nodes_per_replica} nodes" if e.nodes_per_replica > 1 else ""
    one_copy = e.kv_bytes_per_token * e.max_model_len / GIB
    replicated = one_copy and e.kv_cache_gib > one_copy * 1.001
    copies = f", x{e.kv_cache_gib / one_copy:g} across TP ranks" if replicated else ""
    lines = [
        f"{e.model} on {e.npu_type}: {e.hbm_gib:g} GiB HBM per NPU, {e.usable_gib:.1f} GiB usable "
        f"(x{e.gpu_memory_utilization:g})",
        f"  parameters   {e.params_b:9.2f} B",
        f"  weights      {e.weights_gib:9.1f} GiB  ({weights})",
        f"  KV cache     {e.kv_cache_gib:9.1f} GiB  "
        f"(one {e.max_model_len}-token sequence, {kib:g} KiB/token{copies})",
        f"  overhead     {e.overhead_gib:9.1f} GiB  ({WEIGHT_MARGIN:.0%} of weights + "
        f"{OVERHEAD_PER_NPU_GIB:g} GiB x {e.npus_per_replica} NPUs)",
        f"  required     {e.required_gib:9.1f} GiB  ({e.per_npu_gib:.1f} GiB per NPU)",
        f"  parallelism  tensor {e.tensor_parallel} x pipeline {e.pipeline_parallel} = "
        f"{e.npus_per_replica} NPUs per replica{nodes}",
        f"  KV room      about {e.kv_capacity_tokens:,} tokens across concurrent sequences",
        f"  tensor-parallel sizes this model allows: {', '.join(map(str, e.tp_options))}",
    ]
    lines += [f"  note: {n}" for n in e.notes]
    return "\n".join(lines)


def estimate_source(source: str, cache_dir: Path | None = None, **kwargs: Any) -> SizeEstimate:
    """estimate() for a deploy-config model source (its config.json only, never its weights); kwargs as
    estimate()'s."""
    kwargs.setdefault("name", source)
    return estimate(model_config(source, cache_dir), **kwargs)
