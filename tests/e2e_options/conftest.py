"""The second real stack, started after the e2e package's stack has stopped (one engine at a time on 2
cores): deploy_configs/local.yaml with the options the first does not turn on, a reasoning parser and LoRA
adapters, each tested by its own module here. The last module takes the stack's Ray node down."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.serve_cluster import local_stack

MODEL = "smollm2"
ADAPTER = "smollm2-random"  # a LoRA of SmolLM2 with random weights: answers unlike the model's
FOREIGN_ADAPTER = "tiny-llama-lora"  # a LoRA of a 64-wide Llama, listed under SmolLM2: it does not fit


def make_adapters(where: Path) -> dict[str, Path]:
    """Two PEFT LoRA adapters saved as PEFT saves them: one of SmolLM2 (random, so that it changes the answers),
    one of another, smaller Llama whose module names are SmolLM2's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from raystack.models.sources import locate

    torch.manual_seed(0)
    lora = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    smollm2 = AutoModelForCausalLM.from_pretrained(locate("smollm2-135m-instruct"), dtype=torch.float32)
    get_peft_model(smollm2, LoraConfig(**lora)).save_pretrained(where / ADAPTER)
    tiny = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=49152))
    get_peft_model(tiny, LoraConfig(**lora)).save_pretrained(where / FOREIGN_ADAPTER)
    return {ADAPTER: where / ADAPTER, FOREIGN_ADAPTER: where / FOREIGN_ADAPTER}


def with_options(adapters: dict[str, Path]):
    def edit(config: dict) -> None:
        [backend] = [app for app in config["applications"] if app["import_path"].endswith(":build_backend")]
        backend["args"]["backend"]["engine_args"].update(
            reasoning_parser="olmo3", structured_outputs_config={"enable_in_reasoning": True})
        backend["args"]["model"]["adapters"] = [{"name": name, "source": str(path)} for name, path in adapters.items()]
    return edit


@pytest.fixture(scope="package")
def options_server(tmp_path_factory):
    adapters = make_adapters(tmp_path_factory.mktemp("adapters"))
    with local_stack(tmp_path_factory.mktemp("options"), with_options(adapters)) as running:
        yield running


@pytest.fixture(scope="package")
def options_stack(options_server) -> str:
    return options_server["base_url"]
