from pathlib import Path

# The tests' own data (see its README). Nothing in the suite reads a path outside the repository.
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# The config.json of each model the shipped deploy configs name (deploy_configs/*.yaml), as published on its hub.
SHIPPED_MODEL_CONFIGS = {
    "modelscope://Qwen/Qwen3-32B": "qwen3-32b.json",
    "modelscope://Qwen/Qwen3-14B": "qwen3-14b.json",
    "modelscope://deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": "deepseek-r1-distill-qwen-7b.json",
    "modelscope://deepseek-ai/DeepSeek-R1-Distill-Qwen-14B": "deepseek-r1-distill-qwen-14b.json",
    "modelscope://deepseek-ai/DeepSeek-R1-Distill-Qwen-32B": "deepseek-r1-distill-qwen-32b.json",
}


def prime_model_configs(cache_dir: Path) -> Path:
    """A raystack cache holding the config.json of every model the shipped deploy configs name, where
    fetching it alone would put it (<cache>/configs/<hub>/<Org>/<Name>/), as on a machine that reached the hub
    once: what `raystack plan` and `config check` size the shipped configs by, offline."""
    for source, fixture in SHIPPED_MODEL_CONFIGS.items():
        kind, ref = source.split("://")
        target = cache_dir / "configs" / kind / ref / "config.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text((FIXTURES / "model_configs" / fixture).read_text())
    return cache_dir
