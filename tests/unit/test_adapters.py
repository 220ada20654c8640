"""LoRA adapters: the deploy config's rules on them, the check that an adapter fits its model, and what each
engine is given for them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import ray
from safetensors.numpy import save_file

from raystack.app import check_deployable
from raystack.config import Backend, ConfigError, parse_config
from raystack.engines.mindie.config import MindIEPlan, render_config
from raystack.engines.vllm.args import build_engine_args
from raystack.models.adapters import AdapterMismatch, check_fits, prepare_adapters, rank
from tests import FIXTURES
from tests.hub_standin import HubStandIn

Q_PROJ = "model.layers.0.self_attn.q_proj"


def model_dir(root: Path, out_width: int = 32, in_width: int = 16) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text("{}")
    save_file({f"{Q_PROJ}.weight": np.zeros((out_width, in_width), np.float16)}, str(root / "model.safetensors"))
    return root


def lora_dir(root: Path, in_width: int = 16, out_width: int = 32, r: int = 4, module: str = Q_PROJ,
             **config) -> Path:
    root.mkdir(parents=True)
    (root / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, **config}))
    save_file({f"base_model.model.{module}.lora_A.weight": np.zeros((r, in_width), np.float16),
               f"base_model.model.{module}.lora_B.weight": np.zeros((out_width, r), np.float16)},
              str(root / "adapter_model.safetensors"))
    return root


def test_an_adapter_fits_the_model_whose_weights_it_was_made_for(tmp_path):
    check_fits(lora_dir(tmp_path / "lora"), model_dir(tmp_path / "model"))


@pytest.mark.parametrize("made_for, why", [
    ({"in_width": 8}, "takes inputs 8 wide; the model's takes 16"),
    ({"out_width": 64}, "gives outputs 64 wide; the model's gives 32"),
    ({"module": "model.layers.7.mlp.up_proj"}, "it adapts model.layers.7.mlp.up_proj, which the model does not have"),
])
def test_an_adapter_made_for_another_model_is_told_apart_and_how(tmp_path, made_for, why):
    with pytest.raises(AdapterMismatch, match=why):
        check_fits(lora_dir(tmp_path / "lora", **made_for), model_dir(tmp_path / "model"))


def test_what_is_not_a_lora_adapter_is_refused_and_a_model_without_safetensors_is_trusted(tmp_path):
    with pytest.raises(AdapterMismatch, match="only LoRA adapters are served"):
        check_fits(lora_dir(tmp_path / "ia3", peft_type="IA3"), model_dir(tmp_path / "model"))
    bare = tmp_path / "bin-model"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    check_fits(lora_dir(tmp_path / "lora", in_width=8), bare)  # nothing to read shapes from


def test_the_rank_is_the_largest_of_the_adapter(tmp_path):
    assert rank(lora_dir(tmp_path / "a", r=8)) == 8
    assert rank(lora_dir(tmp_path / "b", r=8, rank_pattern={"v_proj": 32})) == 32


def test_a_replica_serves_the_adapters_that_fit_and_says_why_not_for_the_others(tmp_path, monkeypatch):
    model = model_dir(tmp_path / "model")
    adapters = [{"name": "fits", "source": str(lora_dir(tmp_path / "fits"))},
                {"name": "foreign", "source": str(lora_dir(tmp_path / "foreign", in_width=8))},
                {"name": "gone", "source": str(tmp_path / "nowhere")},
                {"name": "hub", "source": "hf://team/sql-lora"}]
    cache = tmp_path / "cache"
    with HubStandIn({"team/sql-lora": lora_dir(tmp_path / "published")}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        try:  # on this node only: the Ray it starts to find the replica's other nodes has none
            ready = prepare_adapters("m", adapters, model, str(cache), False, progress=lambda _: None)
        finally:
            ray.shutdown()
    assert {name: a.path for name, a in ready.served.items()} == {"fits": tmp_path / "fits",
                                                                 "hub": cache / "hf" / "team" / "sql-lora"}
    assert (ready.served["hub"].path / "adapter_model.safetensors").is_file() and ready.served["hub"].rank == 4
    assert ready.unservable["foreign"].status == 400
    assert "`foreign`" in ready.unservable["foreign"].message and "was not made for model `m`" in \
        ready.unservable["foreign"].message
    assert ready.unservable["gone"].status == 503 and "nowhere" in ready.unservable["gone"].message


def config(adapters: list[dict], engine: str = "vllm", name: str = "m", more: list[dict] = ()) -> dict:
    backend = {"name": engine, "engine": engine, "device": "npu" if engine == "mindie" else "cpu"}
    if engine == "mindie":
        backend["mindie"] = {"ascend_home": "/usr/local/Ascend"}
    return {"models": [{"name": name, "source": "/models/m", "adapters": adapters, "backends": [backend]}, *more]}


@pytest.mark.parametrize("adapters, engine, error", [
    ([{"name": "a", "source": "/x"}, {"name": "a", "source": "/y"}], "vllm", "adapter names must be unique"),
    ([{"name": "m", "source": "/x"}], "vllm", "has the model's own name"),
    ([{"name": "a", "source": "smollm2-135m-instruct"}], "vllm", "is an embedded model, not an adapter"),
    ([{"name": "a", "source": "s3://bucket/a"}], "vllm", "unknown scheme"),
    ([{"name": "a", "source": "/x"}], "synthetic", "no backend serves its LoRA adapters"),
    ([{"name": "sql.v2", "source": "/x"}], "mindie", "MindIE takes 1 to 256 of A-Z a-z 0-9 _ - only"),
])
def test_adapter_mistakes_fail_config_check_with_the_fix(adapters, engine, error):
    with pytest.raises(ConfigError, match=error):
        parse_config(config(adapters, engine))


def test_an_adapter_name_means_one_thing_across_models():
    other = {"name": "n", "source": "/models/n", "backends": [{"name": "vllm", "device": "cpu"}],
             "adapters": [{"name": "a", "source": "/y"}]}
    with pytest.raises(ConfigError, match="adapter names across models must be unique"):
        parse_config(config([{"name": "a", "source": "/x"}], more=[other]))
    with pytest.raises(ConfigError, match=r"adapters named like a model: \['n'\]"):
        parse_config(config([{"name": "n", "source": "/x"}], more=[other | {"adapters": []}]))
    assert parse_config(config([{"name": "sql.v2", "source": "/x"}])).models[0].adapters[0].name == "sql.v2"


def test_config_check_finds_a_local_adapter_that_is_not_one(tmp_path):
    model = parse_config(config([{"name": "a", "source": str(tmp_path)}])).models[0]
    model.source = str(model_dir(tmp_path / "model"))
    with pytest.raises(ConfigError, match=r"adapters\[0\].source: .* has no adapter_config.json"):
        check_deployable([model], tmp_path)
    model.adapters = []
    model.source = str(lora_dir(tmp_path / "an-adapter"))  # an adapter given as the model: refused, not served
    with pytest.raises(ConfigError, match=r"source: .*an-adapter has no config.json; is it a model checkpoint\?"):
        check_deployable([model], tmp_path)


def test_vllm_gets_lora_sized_for_the_adapters_unless_the_config_says(tmp_path):
    backend = Backend(name="v", device="cpu", adapters_per_replica=3)
    args = build_engine_args("m", tmp_path, backend, [4, 12])
    assert (args["enable_lora"], args["max_lora_rank"], args["max_loras"], args["max_cpu_loras"]) == (True, 16, 3, 3)
    assert "enable_lora" not in build_engine_args("m", tmp_path, backend, [])
    explicit = Backend(name="v", device="cpu", engine_args={"max_lora_rank": 64, "max_loras": 1})
    args = build_engine_args("m", tmp_path, explicit, [4])
    assert (args["max_lora_rank"], args["max_loras"]) == (64, 1)


def test_mindie_gets_its_adapters_as_lora_modules_of_its_model():
    plan = MindIEPlan(model_name="qwen3", weight_path="/w", npu_ids=[0], port=41234, max_seq_len=4096,
                      max_input_token_len=4096, max_batch_size=8, max_prefill_tokens=8192, max_iter_times=4096,
                      multi_nodes_infer_port=41235, adapters=(("sql", "/a/sql", 8), ("chat", "/a/chat", 16)))
    deploy = render_config(json.loads((FIXTURES / "mindie" / "config.default.json").read_text()),
                           plan)["BackendConfig"]["ModelDeployConfig"]
    assert deploy["LoraModules"] == [{"name": "sql", "path": "/a/sql", "baseModelName": "qwen3"},
                                     {"name": "chat", "path": "/a/chat", "baseModelName": "qwen3"}]
    assert (deploy["maxLoras"], deploy["maxLoraRank"]) == (2, 16)
