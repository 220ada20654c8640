"""API keys: `Authorization: Bearer KEY` on the OpenAI endpoints (router.api_keys in the deploy config).

The keys come from an environment variable or a file of the node that builds the app (Serve builds it on
a node of the cluster), one entry per line (or separated by `;` in an environment variable):

    sk-team-a                      # may use every model
    sk-team-b: qwen3-32b, qwen3-14b  # may use only these models

Only their SHA-256 digests are kept, and only they reach the router; a key is never logged or echoed,
and the variable is blanked in every replica's environment (app.py). Missing or unknown key -> 401; a
key not allowed for the requested model -> 403.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from raystack.protocol import OpenAIError


class APIKeyError(ValueError):
    """The key source is missing, unreadable or empty; the message says which and what to do."""


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class APIKeys:
    """digest of a key -> the models it may use (None: all)."""

    allowed: dict[str, frozenset[str] | None]

    @classmethod
    def parse(cls, text: str, where: str) -> APIKeys:
        allowed: dict[str, frozenset[str] | None] = {}
        for line in text.replace(";", "\n").splitlines():
            entry = line.split("#", 1)[0].strip()
            if not entry:
                continue
            key, _, models = entry.partition(":")
            key = key.strip()
            if not key or any(c.isspace() for c in key):
                raise APIKeyError(f"{where}: an entry is not `KEY` or `KEY: model, model` (keys have no spaces)")
            names = frozenset(m.strip() for m in models.split(",") if m.strip())
            allowed[_digest(key)] = names or None
        if not allowed:
            raise APIKeyError(f"{where} holds no API key: add one per line, or remove router.api_keys")
        return cls(allowed)

    @classmethod
    def load(cls, env: str | None = None, file: str | None = None) -> APIKeys:
        if env is not None:
            text = os.environ.get(env)
            if not text:
                raise APIKeyError(
                    f"router.api_keys: the environment variable {env} is unset or empty on this node; export it "
                    f"where Ray starts (e.g. before `raystack start`), or remove router.api_keys"
                )
            return cls.parse(text, f"environment variable {env}")
        path = Path(file or "").expanduser()
        try:
            return cls.parse(path.read_text(), str(path))
        except OSError as err:
            raise APIKeyError(
                f"router.api_keys: cannot read {path} ({err.strerror}); it must exist on every node of the "
                f"cluster (Serve builds the app on any of them)"
            ) from None

    def check(self, authorization: str | None) -> str:
        """The digest of the request's key; 401 when it is missing or unknown."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise OpenAIError(
                401, "No API key provided. Send it as `Authorization: Bearer YOUR_KEY` (OpenAI clients: api_key=...).",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
            )
        digest = _digest(key.strip())
        if digest not in self.allowed:
            raise OpenAIError(
                401, "Incorrect API key provided. Ask the operator of this endpoint for a valid key.",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
            )
        return digest

    def may_use(self, digest: str, model: str) -> bool:
        models = self.allowed[digest]
        return models is None or model in models

    def require(self, digest: str, model: str) -> None:
        if not self.may_use(digest, model):
            raise OpenAIError(403, f"This API key may not use the model `{model}`.", param="model",
                              code="model_not_allowed")
