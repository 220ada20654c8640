"""A deploy config that cannot work, said by the path of each wrong field and its fix."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A deploy config that cannot work; the message names the field and the fix."""


def _error_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path or "(top level)"


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        path = _error_path(tuple(e["loc"]))
        if prefix:
            path = f"{prefix}.{path}" if path != "(top level)" else prefix
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling and indentation)"
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


ParsedArgs = TypeVar("ParsedArgs", bound=BaseModel)


def parse_args(kind: type[ParsedArgs], args: dict[str, Any] | None, where: str = "args") -> ParsedArgs:
    """An application's `args` as `kind` (RouterConfig, BackendApp, RaystackConfig), or the error by path."""
    try:
        return kind.model_validate(args or {})
    except ValidationError as err:
        raise ConfigError(f"invalid raystack config:\n{format_validation_error(err, where)}") from None
