"""API keys: `Authorization: Bearer KEY` on the OpenAI endpoints (router.api_keys in the deploy config).

The keys come from an environment variable or a file of the node that builds the app (Serve builds it on
a node of the cluster). Named keys are a YAML document:

    keys:
      - name: team-a                 # not secret: what logs, metrics and `raystack usage` show
        key: sk-team-a-7f3a...       # or sha256: <hex digest of the key>, so the file holds no secret
        models: [qwen3-32b]          # default: every model (a model's LoRA adapters come with it)
        requests_per_minute: 600     # optional limits, shared by the router's replicas (ledger.py):
        concurrent_requests: 16      # over one, 429 naming it, with Retry-After
        tokens_per_minute: 200000    # prompt + completion tokens
        tokens_per_day: 5000000      # budgets (UTC day, month): over one, 429 insufficient_quota
        tokens_per_month: 100000000
        weight: 2                    # its share of a full backend, against other keys' (default 1)
        priority: interactive        # its priority class (router.priority), the highest its requests may ask
                                     # for; default: the router's default class

The former format still reads, one entry per line (or separated by `;` in an environment variable):
`KEY` (every model) or `KEY: model, model`; such a key is named after its line (`line-3`).

Only digests are kept, and only they reach the router; a key is never logged or echoed, and the variable is
blanked in every replica's environment (app.py). A file is re-read by the router when it changes
(rotation without a restart); a file that does not parse, or names a model the router does not serve, keeps
the last good keys and is logged with its line. Missing or unknown key -> 401; a key not allowed for the
requested model -> 403.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import yaml
from pydantic import Field, ValidationError, model_validator

from raystack.protocol import OpenAIError
from raystack.router.ledger import LIMITS, KeyLimits

KEY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"  # a metric label's value, a table's column
# libyaml's parser where PyYAML has it: the router reads a changed key file on its event loop, and the
# pure-Python parser took 2.5 s over 10,000 keys. Either resolves and constructs the same values.
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class APIKeyError(ValueError):
    """The key source is missing, unreadable, empty or malformed; the message says where and what to do."""


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyEntry(KeyLimits):
    """One entry of a named-keys document: the key, and its limits (ledger.KeyLimits' fields)."""

    name: str = Field(pattern=KEY_NAME_PATTERN)
    key: str | None = Field(None, min_length=1, pattern=r"^\S+$")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    models: list[str] | None = Field(None, min_length=1)
    weight: float = Field(1, gt=0)
    priority: str | None = Field(None, pattern=KEY_NAME_PATTERN)

    @model_validator(mode="after")
    def _one_secret(self) -> KeyEntry:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("give exactly one of key: (the key itself) or sha256: (its SHA-256, in hex)")
        return self

    @property
    def digest(self) -> str:
        return self.sha256 or _digest(self.key or "")


@dataclass(frozen=True)
class Grant:
    """What a key may do: its name, the models it may use (None: all), its limits, the line that says so,
    its weight: its share of a full backend against other keys' waiting requests (fair_share.py), and its
    priority class, the highest its requests may ask for (None: the router's default class)."""

    name: str
    models: frozenset[str] | None
    line: int
    limits: KeyLimits = KeyLimits()
    weight: float = 1.0
    priority: str | None = None


def _line_entries(text: str) -> list[tuple[str, Grant]]:
    """The former format: (digest, Grant) per `KEY` or `KEY: model, model` line (no limits)."""
    entries = []
    for number, line in enumerate(text.replace(";", "\n").splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        key, _, models = entry.partition(":")
        key = key.strip()
        if not key or any(c.isspace() for c in key):
            raise APIKeyError(f"line {number}: not `KEY` or `KEY: model, model` (keys have no spaces)")
        names = frozenset(m.strip() for m in models.split(",") if m.strip())
        entries.append((_digest(key), Grant(f"line-{number}", names or None, number)))
    return entries


def _named_entries(document: yaml.Node, classes: Iterable[str] | None) -> list[tuple[str, Grant]]:
    """A named-keys document: (digest, Grant) per entry, or the first problem by its line (a priority class
    not among `classes`, the router's, is one)."""
    keys = next((value for key, value in document.value if key.value == "keys"), None)
    if len(document.value) != 1 or not isinstance(keys, yaml.SequenceNode) or not keys.value:
        raise APIKeyError(f"line {document.start_mark.line + 1}: a named-keys document is `keys:` and a list of "
                          f"entries ({{name, key or sha256, models}})")
    entries = []
    # Each entry from its node of the one parse (with its line), not serialised and parsed again.
    constructor = yaml.constructor.SafeConstructor()
    for node in keys.value:
        line = node.start_mark.line + 1
        try:
            entry = KeyEntry.model_validate(constructor.construct_document(node))
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "entry"
            message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
            raise APIKeyError(f"line {line}: {field}: {message}") from None
        if classes is not None and entry.priority is not None and entry.priority not in classes:
            raise APIKeyError(f"line {line}: priority: no class {entry.priority!r} (the router's classes: "
                              f"{', '.join(classes)})")
        limits = KeyLimits(**entry.model_dump(include=set(LIMITS)))
        entries.append((entry.digest, Grant(entry.name, frozenset(entry.models) if entry.models else None, line,
                                            limits, entry.weight, entry.priority)))
    return entries


@dataclass(frozen=True)
class APIKeys:
    """digest of a key -> its Grant; `where` the keys were read from."""

    grants: dict[str, Grant]
    where: str = "keys"

    @classmethod
    def parse(cls, text: str, where: str, classes: Iterable[str] | None = None) -> APIKeys:
        """Every entry of `text`, or APIKeyError naming the line of the first problem: nothing half-read.
        `classes`: the router's priority classes, which a key's `priority` must be one of."""
        try:
            document = yaml.compose(text, Loader=YAML_LOADER) if text.lstrip().startswith("keys:") else None
        except yaml.YAMLError as err:
            raise APIKeyError(f"{where}: not valid YAML: {err}") from None
        try:
            entries = (_named_entries(document, None if classes is None else list(classes))
                       if isinstance(document, yaml.MappingNode) else _line_entries(text))
        except APIKeyError as err:
            raise APIKeyError(f"{where} {err}") from None
        grants: dict[str, Grant] = {}
        lines_of: dict[str, int] = {}
        for digest, grant in entries:
            if grant.name in lines_of:
                raise APIKeyError(f"{where} line {grant.line}: the name {grant.name!r} is taken by line "
                                  f"{lines_of[grant.name]}; names must be unique")
            if digest in grants:
                raise APIKeyError(f"{where} line {grant.line}: the same key as line {grants[digest].line}; give "
                                  f"each name a key of its own")
            lines_of[grant.name] = grant.line
            grants[digest] = grant
        if not grants:
            raise APIKeyError(f"{where} holds no API key: add one, or remove router.api_keys")
        return cls(grants, where)

    @classmethod
    def load(cls, env: str | None = None, file: str | None = None, classes: Iterable[str] | None = None) -> APIKeys:
        if env is not None:
            text = os.environ.get(env)
            if not text:
                raise APIKeyError(
                    f"router.api_keys: the environment variable {env} is unset or empty on this node; export it "
                    f"where Ray starts (e.g. before `raystack start`), or remove router.api_keys"
                )
            return cls.parse(text, f"environment variable {env}", classes)
        path = Path(file or "").expanduser()
        try:
            return cls.parse(path.read_text(), str(path), classes)
        except OSError as err:
            raise APIKeyError(
                f"router.api_keys: cannot read {path} ({err.strerror}); it must exist on every node of the "
                f"cluster (Serve builds the app on any of them)"
            ) from None

    @classmethod
    def load_for(cls, served: Iterable[str], env: str | None = None, file: str | None = None,
                 classes: Iterable[str] | None = None) -> APIKeys:
        """As load, and every model a key names is one of `served` (a key for a model that does not exist is
        a typo more often than a plan); else APIKeyError with a line per such key."""
        keys, served = cls.load(env, file, classes), set(served)
        unknown = [f"{keys.where} line {g.line}: key {g.name}: no model {m!r} is served (models: "
                   f"{', '.join(sorted(served))})" for g in sorted(keys.grants.values(), key=lambda g: g.line)
                   for m in sorted(g.models or ()) if m not in served]
        if unknown:
            raise APIKeyError("; ".join(unknown))
        return keys

    def check(self, authorization: str | None) -> str:
        """The digest of the request's key; 401 when it is missing or unknown."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise OpenAIError(
                401, "No API key provided. Send it as `Authorization: Bearer YOUR_KEY` (OpenAI clients: api_key=...).",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
            )
        digest = _digest(key.strip())
        if digest not in self.grants:
            raise OpenAIError(
                401, "Incorrect API key provided. Ask the operator of this endpoint for a valid key.",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
            )
        return digest

    def may_use(self, digest: str, model: str) -> bool:
        grant = self.grants.get(digest)  # a key rotated out since the request was authenticated: nothing
        return grant is not None and (grant.models is None or model in grant.models)

    def require(self, digest: str, model: str) -> None:
        if not self.may_use(digest, model):
            raise OpenAIError(403, f"This API key may not use the model `{model}`.", param="model",
                              code="model_not_allowed")


@dataclass
class KeyFileWatch:
    """A key file the router re-reads when it changes: its last (mtime, size) seen."""

    path: Path
    seen: tuple[int, int] | None = None

    def changed(self) -> bool:
        try:
            stat = self.path.stat()
        except OSError:
            return False  # gone for a moment (an editor's rename): the last good keys stay
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self.seen:
            return False
        self.seen = stamp
        return True

