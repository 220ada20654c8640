"""How many Ascend NPUs a model needs: weights, KV cache and overhead from its config.json.

`raystack estimate MODEL` prints it; a deploy config's `parallelism: auto` uses it. The rule is
GPUStack's vLLM resource-fit rule (weights x 1.2 + 2 GiB must fit in the sum of HBM x 0.9 of the
devices, whose count divides the attention heads), extended with the KV cache of one full-length
sequence and with the 2 GiB counted per NPU (each NPU runs its own worker, runtime context and graphs):

    weights   = embedding params x dtype bytes + other params x weight bits / 8
    kv_cache  = kv bytes per token x max_model_len x (KV copies across tensor-parallel ranks)
    overhead  = 0.2 x weights + 2 GiB x NPUs
    fits on NPUs = TP x PP  <=>  weights + kv_cache + overhead <= NPUs x HBM x 0.9

TP is the smallest power of two (1, 2, 4, 8, 16, at most one node's NPUs: TP all-reduces every layer
and stays inside a node) that vLLM accepts for the model's heads and fits. When a node at the largest
such TP is not enough, pipeline stages (usually one per node) are added until it fits.

An estimate, not a measurement: vLLM profiles the real peak at start-up. Everything that makes one
rough is said in `SizeEstimate.notes`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from raystack.models.sources import ModelSourceError, default_cache_dir, locate, parse_source, resolve

logger = logging.getLogger(__name__)

GIB = 1024**3
WEIGHT_MARGIN = 0.2  # GPUStack's x1.2: activations, sampler and allocator slack, proportional to weights
OVERHEAD_PER_NPU_GIB = 2.0  # GPUStack's +2 GiB (graph capture, runtime), counted on every NPU here
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default; the share of HBM vLLM lets itself use
TP_CANDIDATES = (1, 2, 4, 8, 16)
DEFAULT_NPU_TYPE = "Ascend910B"


class EstimateError(ValueError):
    """A config or NPU type the estimate cannot work with; the message names what and the fix."""


@dataclass(frozen=True)
class NpuSpec:
    hbm_gib: float  # per NPU device, i.e. per entry in `npu-smi info`
    npus_per_node: int  # in the usual server for this chip
    note: str = ""


# Nominal HBM per NPU device from Huawei's product pages (GB there, taken as GiB here; the driver keeps
# a little for itself, which gpu_memory_utilization 0.9 absorbs). Measure with `npu-smi info` when in doubt.
NPU_TYPES: dict[str, NpuSpec] = {
    "Ascend910B": NpuSpec(64, 8),  # the 910B1/B2/B3 family, Atlas 800I/800T A2
    "Ascend910B1": NpuSpec(64, 8),
    "Ascend910B2": NpuSpec(64, 8),
    "Ascend910B3": NpuSpec(64, 8),
    "Ascend910B4": NpuSpec(32, 8),
    "Ascend910": NpuSpec(  # 910A / 910 Pro B
        32, 8, "Ascend910 (910A): not supported by vllm-ascend (its FAQ lists A2, A3, 300I Duo); for reference"
    ),
    "Ascend310P3": NpuSpec(
        24, 8, "Ascend310P3: 24 GiB per chip; an Atlas 300I Duo card (48 GB) is two chips, i.e. two NPUs "
        "(experimental in vllm-ascend)"
    ),
    "Ascend910_93": NpuSpec(64, 16, "Ascend910_93 (A3): 64 GiB per die; each 910C chip is two dies, two NPUs"),
}
_ALIASES = {"910a": "Ascend910", "910c": "Ascend910_93", "a3": "Ascend910_93", "310p": "Ascend310P3"}

_DTYPE_BYTES = {"bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2, "float32": 4, "fp32": 4, "float": 4}
_MAX_LEN_KEYS = (  # vLLM takes the smallest of these that the config has
    "max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
    "max_sequence_length", "max_seq_length", "seq_len",
)
_QKV_BIAS_MODEL_TYPES = {"qwen2", "qwen2_moe"}  # Qwen2 always has q/k/v biases; its config does not say so
_QUANT_BITS = {  # quant_method -> bits per weight when the config does not say `bits`
    "fp8": 8, "fbgemm_fp8": 8, "ptpc_fp8": 8, "gptq": 4, "awq": 4, "gptq_marlin": 4, "awq_marlin": 4,
    "mxfp4": 4, "bitnet": 2,
}
_ASCEND_QUANT_BITS = {"w8a8": 8, "w8a8_dynamic": 8, "w8a16": 8, "w4a8": 4, "w4a8_dynamic": 4, "w4a16": 4}


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


def npu_spec(npu_type: str) -> tuple[str, NpuSpec]:
    """The canonical name and spec of an NPU type; case, `-` and the `Ascend` prefix do not matter."""
    key = npu_type.strip().lower().replace("-", "").replace(" ", "").removeprefix("ascend")
    for name, spec in NPU_TYPES.items():
        if key == name.lower().removeprefix("ascend"):
            return name, spec
    if key in _ALIASES:
        return _ALIASES[key], NPU_TYPES[_ALIASES[key]]
    known = ", ".join(f"{name} ({spec.hbm_gib:g} GiB)" for name, spec in NPU_TYPES.items())
    raise EstimateError(
        f"unknown NPU type {npu_type!r}; known types: {known}. For another chip give its HBM per NPU "
        f"explicitly (--hbm-gib, as `npu-smi info` shows it)"
    )


# ---------------------------------------------------------------------------------------------- shape


@dataclass(frozen=True)
class _Shape:
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tie: bool
    experts: int  # routed experts per MoE layer; 0 for a dense model
    mla: bool  # DeepSeek's multi-head latent attention: one compressed KV per token, not per head


def language_config(config: dict[str, Any]) -> dict[str, Any]:
    """The decoder's fields: multimodal configs nest them under text_config / llm_config."""
    if "hidden_size" in config or "num_hidden_layers" in config:
        return config
    for key in ("text_config", "llm_config", "language_config"):
        sub = config.get(key)
        if isinstance(sub, dict) and "hidden_size" in sub:
            inherited = ("torch_dtype", "dtype", "quantization_config", "tie_word_embeddings", "_name_or_path")
            return {**{k: config[k] for k in inherited if k in config}, **sub, "_nested_in": key}
    return config


def _shape(cfg: dict[str, Any]) -> _Shape:
    experts = int(cfg.get("num_experts") or cfg.get("n_routed_experts") or cfg.get("num_local_experts") or 0)
    needed = ["hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"]
    if not experts:
        needed.append("intermediate_size")
    missing = [k for k in needed if not cfg.get(k)]
    mla = bool(cfg.get("kv_lora_rank"))
    if mla:
        missing += [k for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim") if not cfg.get(k)]
    if missing:
        kind = cfg.get("model_type") or "this model"
        raise EstimateError(
            f"config.json of {kind} has no {', '.join(missing)}: not a decoder the estimate understands; "
            f"set parallelism (tensor, pipeline) explicitly"
        )
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    return _Shape(
        model_type=str(cfg.get("model_type") or ""),
        hidden=hidden,
        layers=int(cfg["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        intermediate=int(cfg.get("intermediate_size") or 0),
        vocab=int(cfg["vocab_size"]),
        tie=bool(cfg.get("tie_word_embeddings", False)),
        experts=experts,
        mla=mla,
    )


def _attention_params(cfg: dict[str, Any], s: _Shape) -> int:
    h, nh = s.hidden, s.heads
    if s.mla:
        nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
        kv_rank, q_rank = cfg["kv_lora_rank"], cfg.get("q_lora_rank")
        q = h * q_rank + q_rank + q_rank * nh * (nope + rope) if q_rank else h * nh * (nope + rope)
        kv = h * (kv_rank + rope) + kv_rank + kv_rank * nh * (nope + v)
        return q + kv + nh * v * h
    q_out, kv_out = nh * s.head_dim, s.kv_heads * s.head_dim
    params = h * q_out + 2 * h * kv_out + q_out * h  # q, k, v, o
    if s.model_type in _QKV_BIAS_MODEL_TYPES or cfg.get("attention_bias"):
        params += q_out + 2 * kv_out
    if cfg.get("attention_bias") and s.model_type not in _QKV_BIAS_MODEL_TYPES:
        params += h  # o_proj bias
    if s.model_type.startswith("qwen3"):
        params += 2 * s.head_dim  # q_norm, k_norm
    return params


def _is_moe_layer(cfg: dict[str, Any], i: int) -> bool:
    if i in (cfg.get("mlp_only_layers") or []):  # Qwen MoE
        return False
    if i < int(cfg.get("first_k_dense_replace") or 0):  # DeepSeek
        return False
    if (i + 1) % int(cfg.get("decoder_sparse_step") or 1):  # Qwen MoE
        return False
    return i % int(cfg.get("moe_layer_freq") or 1) == 0  # DeepSeek


def _mlp_params(cfg: dict[str, Any], s: _Shape, i: int) -> int:
    h = s.hidden
    if not (s.experts and _is_moe_layer(cfg, i)):
        return 3 * h * s.intermediate  # gate, up, down
    expert = int(cfg.get("moe_intermediate_size") or s.intermediate)
    params = s.experts * 3 * h * expert + h * s.experts  # experts + router
    params += int(cfg.get("n_shared_experts") or 0) * 3 * h * expert  # DeepSeek
    if cfg.get("shared_expert_intermediate_size"):  # Qwen2-MoE: one wide shared expert and its gate
        params += 3 * h * int(cfg["shared_expert_intermediate_size"]) + h
    return params


def embedding_parameters(config: dict[str, Any]) -> int:
    s = _shape(language_config(config))
    return s.vocab * s.hidden * (1 if s.tie else 2)


def count_parameters(config: dict[str, Any]) -> int:
    """Parameters of a Llama/Qwen2/Qwen3-style decoder from config.json; also Qwen-MoE, Mixtral and
    DeepSeek-V2/V3 (MoE, MLA)."""
    cfg = language_config(config)
    s = _shape(cfg)
    per_layer = _attention_params(cfg, s) + 2 * s.hidden  # + input and post-attention norms
    layers = sum(per_layer + _mlp_params(cfg, s, i) for i in range(s.layers))
    return embedding_parameters(cfg) + layers + s.hidden  # + final norm


def kv_cache_bytes_per_token(config: dict[str, Any], dtype_bytes: int = 2) -> int:
    """One token's K and V over all layers (MLA: its one compressed latent), without TP copies."""
    cfg = language_config(config)
    s = _shape(cfg)
    if s.mla:
        return s.layers * (int(cfg["kv_lora_rank"]) + int(cfg["qk_rope_head_dim"])) * dtype_bytes
    return 2 * s.layers * s.kv_heads * s.head_dim * dtype_bytes


def tensor_parallel_options(config: dict[str, Any], max_tp: int = TP_CANDIDATES[-1]) -> tuple[int, ...]:
    """Powers of two vLLM accepts as tensor-parallel size: they divide the attention heads, and the KV
    heads divide by TP or TP by the KV heads (vLLM then replicates KV heads)."""
    s = _shape(language_config(config))
    return tuple(
        tp for tp in TP_CANDIDATES
        if tp <= max_tp and s.heads % tp == 0 and (s.mla or s.kv_heads % tp == 0 or tp % s.kv_heads == 0)
    )


def _kv_copies(s: _Shape, tp: int) -> float:
    """How many times the KV cache is stored across TP ranks, relative to one copy."""
    if s.mla:
        return tp  # vLLM keeps the whole latent cache on every TP rank
    return max(1, s.kv_heads // tp) * tp / s.kv_heads  # each rank holds at least one KV head


def model_max_len(config: dict[str, Any]) -> int:
    """The context length vLLM defaults to: the smallest max-length key, x the RoPE factor for linear and
    dynamic scaling (YaRN, llama3 and longrope configs already state the scaled length)."""
    cfg = language_config(config)
    lengths = [int(cfg[k]) for k in _MAX_LEN_KEYS if isinstance(cfg.get(k), (int, float)) and cfg[k] > 0]
    length = min(lengths) if lengths else 2048  # vLLM's fallback
    rope = _rope_scaling(cfg)
    if rope and _rope_type(rope) in ("linear", "dynamic") and rope.get("factor"):
        length = int(length * float(rope["factor"]))
    return length


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    return rope if isinstance(rope, dict) and _rope_type(rope) not in ("", "default") else None


def _rope_type(rope: dict[str, Any]) -> str:
    return str(rope.get("rope_type") or rope.get("type") or "")


# ------------------------------------------------------------------------------------ dtype and quant


def _serving_dtype(cfg: dict[str, Any], dtype: str | None, notes: list[str]) -> tuple[str, int]:
    if dtype and dtype != "auto":
        name = dtype.lower().removeprefix("torch.")
        if name not in _DTYPE_BYTES:
            raise EstimateError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(_DTYPE_BYTES)}")
        return name, _DTYPE_BYTES[name]
    config_dtype = cfg.get("torch_dtype") or cfg.get("dtype")
    name = str(config_dtype).lower().removeprefix("torch.") if config_dtype else ""
    if name not in _DTYPE_BYTES:
        notes.append(f"config.json has no usable dtype ({config_dtype!r}); assumed bfloat16")
        return "bfloat16", 2
    if _DTYPE_BYTES[name] == 4:
        notes.append(
            "config.json says float32, but vLLM's dtype=auto serves float32 checkpoints in 16-bit, so "
            "2 bytes per value are counted; pass dtype float32 to size for full precision"
        )
        return "bfloat16", 2
    return name, _DTYPE_BYTES[name]


def _weight_bits(cfg: dict[str, Any], dtype_bytes: int, notes: list[str]) -> float:
    full = 8.0 * dtype_bytes
    quant = cfg.get("quantization_config")
    if isinstance(quant, dict) and quant:
        method = str(quant.get("quant_method") or "").lower()
        bits = quant.get("bits") or quant.get("w_bit") or _compressed_tensors_bits(quant)
        if not bits and method == "bitsandbytes":
            bits = 4 if quant.get("load_in_4bit") else 8
        bits = bits or _QUANT_BITS.get(method)
        if not bits:
            what = method or "unknown method"
            notes.append(f"quantization_config ({what}) not understood: weights counted unquantized")
            return full
        notes.append(
            f"quantized checkpoint ({method}, {bits}-bit weights): embeddings and LM head counted at "
            f"{dtype_bytes} bytes, scales and zero points not counted"
        )
        if method in ("fp8", "fbgemm_fp8", "ptpc_fp8"):
            notes.append(
                "Ascend NPUs have no FP8: vllm-ascend serves such a model from a W8A8 conversion (the size "
                "counted here) or a bfloat16 one (twice the weights)"
            )
        return float(bits)
    ascend_quant = str(cfg.get("quantize") or "").lower()  # msModelSlim / MindIE-style checkpoints
    if ascend_quant in _ASCEND_QUANT_BITS:
        notes.append(f"Ascend-quantized checkpoint ({ascend_quant}): embeddings counted at {dtype_bytes} bytes")
        return float(_ASCEND_QUANT_BITS[ascend_quant])
    return full


def _compressed_tensors_bits(quant: dict[str, Any]) -> int | None:
    for group in (quant.get("config_groups") or {}).values():
        bits = ((group or {}).get("weights") or {}).get("num_bits")
        if bits:
            return int(bits)
    return None


# ------------------------------------------------------------------------------------------ estimate


def estimate(
    config: dict[str, Any],
    npu_type: str | None = DEFAULT_NPU_TYPE,
    max_model_len: int | None = None,
    hbm_gib: float | None = None,
    npus_per_node: int | None = None,
    name: str | None = None,
    dtype: str | None = None,
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
) -> SizeEstimate:
    """Size a model (its config.json as a dict) for one NPU type; see the module docstring for the rule.

    npu_type: a key of NPU_TYPES (or an alias like 910B4); any name when hbm_gib is given; None: Ascend910B.
    max_model_len: the context to size the KV cache for; default: the model's (as vLLM derives it).
    npus_per_node: caps TP (default: per NPU type, 8; 16 on A3).
    dtype: the engine's dtype argument (auto, bfloat16, float16, float32); default auto.
    """
    notes: list[str] = []
    cfg = language_config(config)
    if "_nested_in" in cfg:
        notes.append(f"multimodal config: only the language model ({cfg['_nested_in']}) is counted")
    s = _shape(cfg)
    model = name or str(config.get("_name_or_path") or cfg.get("_name_or_path") or "model")

    npu_type = npu_type or DEFAULT_NPU_TYPE
    if hbm_gib is not None:
        if hbm_gib <= 0:
            raise EstimateError(f"hbm_gib must be positive, got {hbm_gib}")
        spec = NpuSpec(hbm_gib, 8)
        try:
            npu_type, known = npu_spec(npu_type)
            spec = NpuSpec(hbm_gib, known.npus_per_node, known.note)
        except EstimateError:
            pass
        notes.append(f"HBM per NPU given explicitly: {hbm_gib:g} GiB")
    else:
        npu_type, spec = npu_spec(npu_type)
    if spec.note:
        notes.append(spec.note)
    per_node = npus_per_node or spec.npus_per_node
    if per_node < 1:
        raise EstimateError(f"npus_per_node must be at least 1, got {per_node}")
    if not 0 < gpu_memory_utilization <= 1:
        raise EstimateError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")

    default_len = model_max_len(cfg)
    rope = _rope_scaling(cfg)
    if max_model_len is None:
        max_model_len = default_len
        if rope:
            notes.append(
                f"config enables {_rope_type(rope)} RoPE scaling; sized for the model's default context "
                f"{default_len}; pass max_model_len to size for the context you serve"
            )
    elif max_model_len < 1:
        raise EstimateError(f"max_model_len must be positive, got {max_model_len}")
    elif max_model_len > default_len:
        notes.append(
            f"max_model_len {max_model_len} exceeds the model's {default_len}: vLLM refuses it unless "
            f"VLLM_ALLOW_LONG_MAX_MODEL_LEN=1"
        )

    dtype_name, dtype_bytes = _serving_dtype(cfg, dtype, notes)
    weight_bits = _weight_bits(cfg, dtype_bytes, notes)
    params = count_parameters(cfg)
    embed = embedding_parameters(cfg)
    weights_gib = (embed * dtype_bytes + (params - embed) * weight_bits / 8) / GIB
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
        return weights_gib * (1 + WEIGHT_MARGIN) + kv_one_copy_gib * _kv_copies(s, tp)

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
    kv_gib = kv_one_copy_gib * _kv_copies(s, tp)
    overhead = weights_gib * WEIGHT_MARGIN + OVERHEAD_PER_NPU_GIB * npus
    return SizeEstimate(
        model=model,
        params_b=params / 1e9,
        dtype=dtype_name,
        dtype_bytes=dtype_bytes,
        weight_bits=weight_bits,
        weights_gib=weights_gib,
        kv_bytes_per_token=kv_per_token,
        kv_cache_gib=kv_gib,
        overhead_gib=overhead,
        required_gib=weights_gib + kv_gib + overhead,
        npu_type=npu_type,
        hbm_gib=float(spec.hbm_gib),
        gpu_memory_utilization=gpu_memory_utilization,
        npus_per_node=per_node,
        max_model_len=max_model_len,
        tensor_parallel=tp,
        pipeline_parallel=pp,
        tp_options=options,
        notes=tuple(notes),
    )


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


# ------------------------------------------------------------------------------------- model configs


def load_model_config(
    source: str, cache_dir: Path | None = None, progress: Callable[[str], None] = logger.info
) -> dict[str, Any]:
    """config.json of a deploy-config model source, without downloading the weights.

    A local directory, a downloaded hub model or a prepared embedded model gives it directly; an embedded
    model is prepared (offline); for a hub model not downloaded yet only config.json is fetched, into
    <cache>/configs/<hub>/<Org>/<Name>/. Failures raise ModelSourceError naming the model and the fix.
    """
    src = parse_source(source)
    cache_dir = cache_dir or default_cache_dir()
    ready = locate(source, cache_dir)
    if ready is not None:
        return _read_config(ready / "config.json")
    if src.kind in ("local", "embedded"):
        return _read_config(resolve(source, cache_dir, progress=progress) / "config.json")
    path = cache_dir / "configs" / src.kind / src.ref / "config.json"
    if not path.is_file():
        _download_config(src, path.parent, progress)
    return _read_config(path)


def estimate_source(source: str, cache_dir: Path | None = None, **kwargs: Any) -> SizeEstimate:
    """estimate() for a deploy-config model source; kwargs as estimate()'s."""
    kwargs.setdefault("name", source)
    return estimate(load_model_config(source, cache_dir), **kwargs)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"cannot read {path}: {err}") from None
    if not isinstance(config, dict):
        raise ModelSourceError(f"{path} is not a JSON object")
    return config


def _download_config(src: Any, out: Path, progress: Callable[[str], None]) -> None:
    hub = "ModelScope" if src.kind == "modelscope" else "Hugging Face"
    progress(f"{src}: fetching config.json from {hub}")
    out.mkdir(parents=True, exist_ok=True)
    try:
        if src.kind == "modelscope":
            from modelscope.hub.file_download import model_file_download

            # The endpoint is read now, not when modelscope first configured itself, and the revision is
            # named: without one modelscope looks up a release revision on its default endpoint.
            model_file_download(
                src.ref, "config.json", revision="master", local_dir=str(out),
                endpoint=os.environ.get("MODELSCOPE_ENDPOINT") or None,
            )
        else:
            from huggingface_hub import hf_hub_download

            hf_hub_download(
                repo_id=src.ref, filename="config.json", local_dir=str(out),
                endpoint=os.environ.get("HF_ENDPOINT") or None,
            )
    except Exception as err:  # network, auth, missing repo: all end the same way for the user
        raise ModelSourceError(
            f"could not fetch config.json of {src} from {hub}: {type(err).__name__}: {str(err).rstrip('.')}. "
            f"If this machine is offline, estimate from a local copy instead (`raystack estimate "
            f"/path/to/model`, a directory with its config.json), or download the model where {hub} is "
            f"reachable (`raystack models prepare {src}`) and set `source:` to its local path."
        ) from None
    if not (out / "config.json").is_file():
        raise ModelSourceError(f"{src} on {hub} has no config.json; is it a model checkpoint?")
