"""A decoder model's shape from its config.json: parameters, KV cache per token, context length, the
tensor-parallel sizes vLLM accepts, the serving dtype and weight bits. What `raystack estimate` sizes
NPUs from (cluster/estimate.py); Llama/Qwen2/Qwen3-style decoders, Qwen-MoE, Mixtral and DeepSeek-V2/V3
(MoE, MLA). Every function takes config.json as a dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TP_CANDIDATES = (1, 2, 4, 8, 16)


class ModelShapeError(ValueError):
    """A config.json this module cannot read a decoder from; the message says what is missing and the fix."""


DTYPE_BYTES = {"bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2, "float32": 4, "fp32": 4, "float": 4}
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
class Shape:
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


def shape(cfg: dict[str, Any]) -> Shape:
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
        raise ModelShapeError(
            f"config.json of {kind} has no {', '.join(missing)}: not a decoder the estimate understands; "
            f"set parallelism (tensor, pipeline) explicitly"
        )
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    return Shape(
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


def _attention_params(cfg: dict[str, Any], s: Shape) -> int:
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


def _mlp_params(cfg: dict[str, Any], s: Shape, i: int) -> int:
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
    s = shape(language_config(config))
    return s.vocab * s.hidden * (1 if s.tie else 2)


def count_parameters(config: dict[str, Any]) -> int:
    """Parameters of a Llama/Qwen2/Qwen3-style decoder from config.json; also Qwen-MoE, Mixtral and
    DeepSeek-V2/V3 (MoE, MLA)."""
    cfg = language_config(config)
    s = shape(cfg)
    per_layer = _attention_params(cfg, s) + 2 * s.hidden  # + input and post-attention norms
    layers = sum(per_layer + _mlp_params(cfg, s, i) for i in range(s.layers))
    return embedding_parameters(cfg) + layers + s.hidden  # + final norm


def kv_cache_bytes_per_token(config: dict[str, Any], dtype_bytes: int = 2) -> int:
    """One token's K and V over all layers (MLA: its one compressed latent), without TP copies."""
    cfg = language_config(config)
    s = shape(cfg)
    if s.mla:
        return s.layers * (int(cfg["kv_lora_rank"]) + int(cfg["qk_rope_head_dim"])) * dtype_bytes
    return 2 * s.layers * s.kv_heads * s.head_dim * dtype_bytes


def tensor_parallel_options(config: dict[str, Any], max_tp: int = TP_CANDIDATES[-1]) -> tuple[int, ...]:
    """Powers of two vLLM accepts as tensor-parallel size: they divide the attention heads, and the KV
    heads divide by TP or TP by the KV heads (vLLM then replicates KV heads)."""
    s = shape(language_config(config))
    return tuple(
        tp for tp in TP_CANDIDATES
        if tp <= max_tp and s.heads % tp == 0 and (s.mla or s.kv_heads % tp == 0 or tp % s.kv_heads == 0)
    )


def kv_copies(s: Shape, tp: int) -> float:
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
    rope = rope_scaling(cfg)
    if rope and rope_type(rope) in ("linear", "dynamic") and rope.get("factor"):
        length = int(length * float(rope["factor"]))
    return length


def rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    return rope if isinstance(rope, dict) and rope_type(rope) not in ("", "default") else None


def rope_type(rope: dict[str, Any]) -> str:
    return str(rope.get("rope_type") or rope.get("type") or "")


def serving_dtype(cfg: dict[str, Any], dtype: str | None, notes: list[str]) -> tuple[str, int]:
    if dtype and dtype != "auto":
        name = dtype.lower().removeprefix("torch.")
        if name not in DTYPE_BYTES:
            raise ModelShapeError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPE_BYTES)}")
        return name, DTYPE_BYTES[name]
    config_dtype = cfg.get("torch_dtype") or cfg.get("dtype")
    name = str(config_dtype).lower().removeprefix("torch.") if config_dtype else ""
    if name not in DTYPE_BYTES:
        notes.append(f"config.json has no usable dtype ({config_dtype!r}); assumed bfloat16")
        return "bfloat16", 2
    if DTYPE_BYTES[name] == 4:
        notes.append(
            "config.json says float32, but vLLM's dtype=auto serves float32 checkpoints in 16-bit, so "
            "2 bytes per value are counted; pass dtype float32 to size for full precision"
        )
        return "bfloat16", 2
    return name, DTYPE_BYTES[name]


def quantized_bits(cfg: dict[str, Any], dtype_bytes: int, notes: list[str]) -> float:
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
