"""`raystack estimate`: parameters, KV cache and NPUs per replica from config.json, on public architectures.

The fixtures in tests/fixtures/model_configs/ are the architecture fields of the models' public
config.json files. Sizes are GiB (2**30 bytes); the rule is in raystack/cluster/estimate.py.
"""

import json
import socket
import time
from pathlib import Path

import pytest

from raystack.cluster import estimate as est
from raystack.cluster.estimate import EstimateError, format_estimate
from raystack.engines.vllm import GPU_MEMORY_UTILIZATION
from raystack.models import embedded
from raystack.models.shape import count_parameters, kv_cache_bytes_per_token, model_max_len, tensor_parallel_options
from raystack.models.sources import ModelSourceError, model_config

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "model_configs"


def cfg(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def estimate(config: dict, *args, **kwargs) -> est.SizeEstimate:
    """The estimate for a vLLM backend that leaves gpu_memory_utilization unset, as `raystack estimate` sizes."""
    return est.estimate(config, *args, **{"gpu_memory_utilization": GPU_MEMORY_UTILIZATION, **kwargs})


# ------------------------------------------------------------------------------ parameter counts


@pytest.mark.parametrize(
    "name, params",
    [
        # Exact sums of the weight shapes; the model cards round them to 32.8B, 14.8B, 7.6B, 30.5B, 671B.
        ("qwen3-32b", 32_762_123_264),
        ("qwen3-14b", 14_768_307_200),
        ("deepseek-r1-distill-qwen-7b", 7_615_616_512),
        ("deepseek-r1-distill-qwen-14b", 14_770_033_664),
        ("deepseek-r1-distill-qwen-32b", 32_763_876_352),
        ("smollm2-135m-instruct", 134_515_008),
        ("qwen3-30b-a3b", 30_532_122_624),
        ("deepseek-v3", 671_026_404_352),
    ],
)
def test_parameter_count(name, params):
    assert count_parameters(cfg(name)) == params


def test_qwen2_counts_qkv_biases_and_qwen3_its_qk_norms():
    qwen2 = cfg("deepseek-r1-distill-qwen-32b")
    llama_like = {**qwen2, "model_type": "llama"}
    h, kv = 5120, 8 * 128
    assert count_parameters(qwen2) - count_parameters(llama_like) == 64 * (h + 2 * kv)

    qwen3 = cfg("qwen3-32b")
    assert count_parameters(qwen3) - count_parameters({**qwen3, "model_type": "llama"}) == 64 * 2 * 128


def test_tied_embeddings_are_counted_once():
    smol = cfg("smollm2-135m-instruct")
    assert count_parameters({**smol, "tie_word_embeddings": False}) - count_parameters(smol) == 49152 * 576


# --------------------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize(
    "name, per_token",
    [
        ("qwen3-32b", 2 * 64 * 8 * 128 * 2),  # 256 KiB
        ("deepseek-r1-distill-qwen-7b", 2 * 28 * 4 * 128 * 2),  # head_dim = 3584 / 28
        ("smollm2-135m-instruct", 2 * 30 * 3 * 64 * 2),
        ("deepseek-v3", 61 * (512 + 64) * 2),  # MLA: one latent + rope key per token and layer
    ],
)
def test_kv_bytes_per_token(name, per_token):
    assert kv_cache_bytes_per_token(cfg(name)) == per_token


def test_kv_cache_is_one_full_length_sequence():
    e = estimate(cfg("qwen3-32b"), max_model_len=40960)
    assert e.kv_cache_gib == pytest.approx(10.0)  # 40960 x 256 KiB
    assert e.max_model_len == 40960


def test_kv_heads_replicated_beyond_their_count_are_counted():
    # 8 KV heads at TP 16: vLLM keeps one head per rank, so the cache is stored twice.
    e = estimate(cfg("qwen3-32b"), "Ascend910_93", max_model_len=4096, hbm_gib=8)
    assert e.tensor_parallel == 16
    assert e.kv_cache_gib == pytest.approx(2 * 1.0)


# ------------------------------------------------------------------------ the reference models


def fit(name, npu="Ascend910B", max_model_len=None):
    e = estimate(cfg(name), npu, max_model_len=max_model_len)
    return e.tensor_parallel, e.pipeline_parallel


@pytest.mark.parametrize(
    "name, max_model_len, tp",
    [
        # Qwen3-32B: 61.0 GiB of bf16 weights; x1.2 + 2 GiB alone is over one 910B's 57.6 usable GiB.
        ("qwen3-32b", 4096, 2),
        ("qwen3-32b", None, 2),  # 40960 tokens add 10 GiB: 87.2 GiB on 2 x 57.6 still fits
        ("qwen3-14b", 4096, 1),
        ("qwen3-14b", None, 1),  # 40960 tokens: 41.3 GiB
        ("deepseek-r1-distill-qwen-7b", 32768, 1),
        ("deepseek-r1-distill-qwen-7b", None, 1),  # even 131072 tokens (7 GiB KV): 26.0 GiB
        ("deepseek-r1-distill-qwen-14b", 4096, 1),  # 35.8 GiB
        ("deepseek-r1-distill-qwen-14b", 32768, 1),  # 41.0 GiB
        ("deepseek-r1-distill-qwen-14b", None, 2),  # 131072 tokens = 24 GiB of KV: 61.0 GiB, over one NPU
        ("deepseek-r1-distill-qwen-32b", 4096, 2),
        ("deepseek-r1-distill-qwen-32b", None, 2),  # 131072 tokens: 109.2 GiB on 2 x 57.6
        ("smollm2-135m-instruct", None, 1),
        ("qwen3-30b-a3b", 4096, 2),  # MoE: all 128 experts are in memory, 56.9 GiB of weights
    ],
)
def test_reference_models_on_910b(name, max_model_len, tp):
    assert fit(name, max_model_len=max_model_len) == (tp, 1)


def test_qwen3_32b_numbers():
    e = estimate(cfg("qwen3-32b"), "Ascend910B", max_model_len=4096, name="Qwen3-32B")
    assert e.params_b == pytest.approx(32.76, abs=0.01)
    assert e.weights_gib == pytest.approx(61.02, abs=0.01)  # 65.5 GB: the "~79 GB x1.2" of the rule
    assert e.overhead_gib == pytest.approx(0.2 * e.weights_gib + 2 * 2)
    assert e.required_gib == pytest.approx(e.weights_gib + e.kv_cache_gib + e.overhead_gib)
    assert (e.tensor_parallel, e.pipeline_parallel, e.npus_per_replica, e.nodes_per_replica) == (2, 1, 2, 1)
    assert e.per_npu_gib <= e.usable_gib == pytest.approx(57.6)


def test_smaller_npus_need_more_of_them():
    assert fit("qwen3-32b", "Ascend910B4", 4096) == (4, 1)  # 32 GiB per NPU
    assert fit("qwen3-14b", "Ascend910B4", 4096) == (2, 1)
    assert fit("deepseek-r1-distill-qwen-7b", "Ascend910B4", 32768) == (1, 1)
    assert fit("deepseek-r1-distill-qwen-7b", "Ascend310P3", 32768) == (1, 1)  # 24 GiB per chip: 18.8 + 2
    assert fit("deepseek-r1-distill-qwen-7b", "Ascend310P3") == (2, 1)  # 131072 tokens add 5.25 GiB


def test_tp_options_divide_the_heads():
    assert tensor_parallel_options(cfg("smollm2-135m-instruct")) == (1,)  # 9 heads
    assert tensor_parallel_options(cfg("deepseek-r1-distill-qwen-7b")) == (1, 2, 4)  # 28 heads
    assert tensor_parallel_options(cfg("deepseek-r1-distill-qwen-32b")) == (1, 2, 4, 8)  # 40 heads
    assert tensor_parallel_options(cfg("qwen3-32b")) == (1, 2, 4, 8, 16)  # 64 heads
    # vLLM also needs the KV heads to divide by TP or TP by them: 12 heads with 3 KV heads rule out 2 and 4.
    assert tensor_parallel_options({**cfg("qwen3-14b"), "num_attention_heads": 12, "num_key_value_heads": 3}) == (1,)


def test_a3_nodes_allow_tp_16():
    assert max(estimate(cfg("qwen3-32b"), "Ascend910_93").tp_options) == 16  # 16 dies per node
    assert max(estimate(cfg("qwen3-32b"), "Ascend910B").tp_options) == 8  # TP stays inside a node of 8


# ------------------------------------------------------------------------- pipeline parallelism


def test_beyond_a_node_pipeline_stages_are_added():
    e = estimate(cfg("deepseek-v3"), "Ascend910B", max_model_len=4096)
    assert (e.tensor_parallel, e.pipeline_parallel) == (8, 2)  # 16 NPUs: two Atlas 800 A2 nodes
    assert (e.npus_per_replica, e.nodes_per_replica) == (16, 2)
    assert e.weight_bits == 8  # FP8 checkpoint
    assert any("pipeline parallel" in n for n in e.notes)
    assert any("MoE" in n for n in e.notes) and any("FP8" in n for n in e.notes)


def test_heads_that_allow_only_tp_1_go_to_pipeline_stages():
    # 0.48 GiB of weights x1.2 + KV; 2.5 GiB x 0.9 - 2 GiB overhead leaves 0.25 GiB per NPU.
    e = estimate(cfg("smollm2-135m-instruct"), "tiny", hbm_gib=2.5, max_model_len=8192)
    assert (e.tensor_parallel, e.pipeline_parallel) == (1, 2)


def test_a_model_that_fits_nowhere_says_so():
    with pytest.raises(EstimateError, match="does not fit"):
        estimate(cfg("deepseek-v3"), "tiny", hbm_gib=4)


# ------------------------------------------------------------------------- dtype, length, types


def test_dtype_and_quantization():
    qwen = cfg("qwen3-14b")
    assert estimate({**qwen, "torch_dtype": "float32"}).dtype_bytes == 2  # vLLM's dtype=auto downcasts
    assert estimate(qwen, dtype="float32").dtype_bytes == 4
    awq = estimate({**qwen, "quantization_config": {"quant_method": "awq", "bits": 4}})
    assert awq.weight_bits == 4
    embed = 151936 * 5120 * 2
    assert awq.weights_gib == pytest.approx((embed * 2 + (count_parameters(qwen) - embed) / 2) / 2**30)
    assert any("quantized" in n for n in awq.notes)
    odd = estimate({**qwen, "quantization_config": {"quant_method": "mystery"}})
    assert odd.weight_bits == 16 and any("not understood" in n for n in odd.notes)


def test_default_context_and_rope_scaling():
    assert model_max_len(cfg("qwen3-32b")) == 40960
    linear = {**cfg("qwen3-14b"), "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    assert model_max_len(linear) == 81920
    yarn = {**cfg("qwen3-32b"), "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 32768}}
    e = estimate(yarn)
    assert e.max_model_len == 40960 and any("yarn" in n for n in e.notes)
    assert any("exceeds" in n for n in estimate(cfg("qwen3-32b"), max_model_len=131072).notes)


def test_npu_types_and_explicit_hbm():
    assert estimate(cfg("qwen3-14b"), "910b4").npu_type == "Ascend910B4"
    assert estimate(cfg("qwen3-14b"), None).npu_type == "Ascend910B"
    duo = estimate(cfg("qwen3-14b"), "Ascend310P3")
    assert duo.hbm_gib == 24 and any("300I Duo" in n for n in duo.notes)
    with pytest.raises(EstimateError, match="Ascend910B4 \\(32 GiB\\).*--hbm-gib"):
        estimate(cfg("qwen3-14b"), "Ascend950")
    e = estimate(cfg("qwen3-14b"), "Ascend950", hbm_gib=128)
    assert (e.npu_type, e.hbm_gib, e.tensor_parallel) == ("Ascend950", 128, 1)


@pytest.mark.parametrize("name, npu_type, hbm, per_node", [
    # every name the estimate took before chips.py became its table, printed as before
    ("Ascend910B", "Ascend910B", 64, 8), ("910b", "Ascend910B", 64, 8), ("Ascend-910B", "Ascend910B", 64, 8),
    ("910b1", "Ascend910B1", 64, 8), ("Ascend910B2", "Ascend910B2", 64, 8), ("ascend 910b3", "Ascend910B3", 64, 8),
    ("Ascend910B4", "Ascend910B4", 32, 8), ("910", "Ascend910", 32, 8), ("Ascend910", "Ascend910", 32, 8),
    ("910c", "Ascend910_93", 64, 16), ("a3", "Ascend910_93", 64, 16), ("Ascend910_93", "Ascend910_93", 64, 16),
    ("310p", "Ascend310P3", 24, 8), ("310p3", "Ascend310P3", 24, 8),
    # 910A is named as the model it is (it was "Ascend910", the family); same size and note
    ("910a", "Ascend910A", 32, 8),
    # and the models chips.py knows a size for, which the estimate's own table lacked
    ("910B4-1", "Ascend910B4-1", 64, 8), ("910B2C", "Ascend910B2C", 64, 8), ("Ascend910_9392", "Ascend910_9392", 64, 16),
    ("910ProB", "Ascend910ProB", 32, 8), ("A2", "Ascend910B", 64, 8),
])
def test_npu_type_names(name, npu_type, hbm, per_node):
    e = estimate(cfg("qwen3-14b"), name)
    assert (e.npu_type, e.hbm_gib, e.npus_per_node) == (npu_type, hbm, per_node)


@pytest.mark.parametrize("name", ["Ascend950", "310P1", "Ascend310P3vir04", "Ascend310B4", "A100"])
def test_chips_of_no_nominal_size_need_hbm_gib(name):
    with pytest.raises(EstimateError, match="known types: Ascend910B \\(64 GiB\\), Ascend910B4 \\(32 GiB\\)"):
        estimate(cfg("qwen3-14b"), name)
    assert estimate(cfg("qwen3-14b"), name, hbm_gib=48).hbm_gib == 48


def test_multimodal_configs_use_the_text_model():
    nested = {"architectures": ["X"], "torch_dtype": "bfloat16", "text_config": cfg("qwen3-14b")}
    e = estimate(nested)
    assert e.params_b == pytest.approx(14.77, abs=0.01)
    assert any("multimodal" in n for n in e.notes)


def test_an_unknown_architecture_is_an_error_not_a_crash():
    with pytest.raises(EstimateError, match="no hidden_size.*set parallelism"):
        estimate({"model_type": "t5", "d_model": 512})


def test_format_estimate():
    text = format_estimate(estimate(cfg("qwen3-32b"), max_model_len=4096, name="Qwen3-32B"))
    assert text.splitlines()[0] == "Qwen3-32B on Ascend910B: 64 GiB HBM per NPU, 57.6 GiB usable (x0.9)"
    assert "tensor 2 x pipeline 1 = 2 NPUs per replica" in text
    assert "tensor-parallel sizes this model allows: 1, 2, 4, 8" in text
    ds = format_estimate(estimate(cfg("deepseek-v3"), max_model_len=4096))
    assert "16 NPUs per replica on 2 nodes" in ds and "x8 across TP ranks" in ds


def test_as_dict_has_the_derived_numbers():
    d = estimate(cfg("qwen3-32b"), max_model_len=4096).as_dict()
    assert (d["npus_per_replica"], d["tensor_parallel"]) == (2, 2)
    json.dumps(d)


# -------------------------------------------------------------------------------- config loading


def test_local_directory(tmp_path):
    (tmp_path / "config.json").write_text((FIXTURES / "qwen3-14b.json").read_text())
    assert model_config(str(tmp_path), tmp_path / "cache") == cfg("qwen3-14b")
    e = est.estimate_source(str(tmp_path), tmp_path / "cache", max_model_len=4096,
                            gpu_memory_utilization=GPU_MEMORY_UTILIZATION)
    assert (e.model, e.tensor_parallel) == (str(tmp_path), 1)


def test_local_directory_without_config(tmp_path):
    with pytest.raises(ModelSourceError, match="config.json"):
        model_config(str(tmp_path), tmp_path / "cache")


def test_prepared_embedded_model_is_read_without_preparing(tmp_path):
    model = embedded.EMBEDDED_MODELS["smollm2-135m-instruct"]
    out = embedded.prepared_dir(model, tmp_path)
    out.mkdir(parents=True)
    (out / "config.json").write_text((FIXTURES / "smollm2-135m-instruct.json").read_text())
    marker = {"gguf_sha256": model.gguf_sha256, "recipe": embedded.RECIPE, "files": {"config.json": "unchecked"}}
    (out / embedded.MARKER).write_text(json.dumps(marker))
    assert model_config("smollm2-135m-instruct", tmp_path)["num_attention_heads"] == 9


def test_downloaded_hub_model_and_fetched_config_are_reused(tmp_path, no_internet):
    done = tmp_path / "modelscope" / "Qwen" / "Qwen3-32B"
    done.mkdir(parents=True)
    (done / "config.json").write_text((FIXTURES / "qwen3-32b.json").read_text())
    (done / ".raystack-complete").write_text(json.dumps({"config.json": (done / "config.json").stat().st_size}))
    assert model_config("modelscope://Qwen/Qwen3-32B", tmp_path)["num_hidden_layers"] == 64

    fetched = tmp_path / "configs" / "hf" / "Qwen" / "Qwen3-14B"
    fetched.mkdir(parents=True)
    (fetched / "config.json").write_text((FIXTURES / "qwen3-14b.json").read_text())
    assert model_config("hf://Qwen/Qwen3-14B", tmp_path)["num_hidden_layers"] == 40
    assert no_internet == []  # nothing was contacted


@pytest.fixture
def no_internet(monkeypatch):
    """Refuse every connection that is not to this machine; the list records the attempts."""
    attempts = []
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def local(host) -> bool:
        return str(host) in ("127.0.0.1", "::1", "localhost")

    def getaddrinfo(host, *args, **kwargs):
        if not local(host):
            attempts.append(host)
            raise socket.gaierror(f"test: no DNS for {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not local(address[0]):
            attempts.append(address)
            raise ConnectionRefusedError(f"test: no connection to {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


@pytest.mark.parametrize(
    "source, env",
    [
        # The hub endpoints point at a closed local port: the real download code fails at the network.
        ("hf://Qwen/Qwen3-0.6B", {"HF_ENDPOINT": "http://127.0.0.1:9"}),
        ("modelscope://Qwen/Qwen3-0.6B", {"MODELSCOPE_ENDPOINT": "http://127.0.0.1:9"}),
    ],
)
def test_offline_config_fetch_names_the_model_and_the_fix(tmp_path, monkeypatch, no_internet, source, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # The hubs retry with back-off (~25 s and ~50 s); the retries are theirs, skip the waiting.
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    monkeypatch.setattr("modelscope_hub._download.DOWNLOAD_RETRY_TIMES", 0, raising=False)
    with pytest.raises(ModelSourceError) as err:
        model_config(source, tmp_path)
    message = str(err.value)
    assert f"could not fetch config.json of {source}" in message
    assert "raystack estimate /path/to/model" in message and "set `source:` to its local path" in message
    kind, ref = source.split("://")
    assert not (tmp_path / "configs" / kind / ref / "config.json").exists()
    assert no_internet == []  # only the closed local port was tried


def test_parallelism_auto_sizes_each_engine_within_its_own_memory_share(tmp_path):
    """`parallelism: auto` sizes within the engine's own share of HBM: MindIE's npu_memory_fraction, not vLLM's
    gpu_memory_utilization key, which a MindIE backend does not have (it was read, at its 0.9 default)."""
    from raystack.app import resolve_parallelism
    from raystack.config import Backend, Model

    (tmp_path / "config.json").write_text((FIXTURES / "qwen3-14b.json").read_text())

    def sized(backend: Backend) -> tuple[int, int]:
        model = Model(name="qwen3-14b", source=str(tmp_path), backends=[backend])
        resolve_parallelism([model], tmp_path)
        return model.backends[0].parallel.tensor, model.backends[0].parallel.pipeline

    def mindie(fraction: float) -> Backend:
        return Backend(name="mindie", engine="mindie", parallelism="auto", accelerator={"type": "Ascend910B3"},
                       max_model_len=32768, mindie={"npu_memory_fraction": fraction})

    assert sized(mindie(0.9)) == (1, 1)  # ~45 GiB of a 64 GB 910B3 at 0.9
    assert sized(mindie(0.5)) == (2, 1)  # half of each NPU: two of them
    vllm = Backend(name="vllm", parallelism="auto", device="npu", accelerator={"type": "Ascend910B3"},
                   max_model_len=32768, engine_args={"gpu_memory_utilization": 0.5})
    assert sized(vllm) == (2, 1)
