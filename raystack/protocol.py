"""OpenAI wire protocol at the router: request shapes it checks, error bodies, SSE framing.

The router checks what every engine needs (a model name, the shape of messages and the common sampling
fields) so a malformed request gets a 400 before it costs an engine anything. Everything else passes
through to the engine untouched (extra keys are allowed: vLLM's own parameters such as `ignore_eos`).
Types are strict: `"max_tokens": "5"` is a 400, not a string an engine would choke on later.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


# Token counts and ids fit in 32 bits in every engine; seeds in 64 (vLLM's bounds).
MAX_INT32 = 2**31 - 1
INT64 = (-(2**63), 2**63 - 1)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Open):
    include_usage: bool | None = None


class _SamplingFields(_Open):
    model: str = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    n: int | None = Field(None, ge=1, le=128)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stop: str | list[str] | None = Field(None, description="a string or a list of strings")
    seed: int | None = Field(None, ge=INT64[0], le=INT64[1])
    user: str | None = None


class ContentPart(_Open):
    type: str = Field(min_length=1, description="text, image_url, ...")


class ChatMessage(_Open):
    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    content: str | list[ContentPart] | None = Field(
        None, description='a string, a list of content parts ({"type": "text", "text": ...}) or null'
    )


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_INT32)


TokenId = Annotated[int, Field(ge=0, le=MAX_INT32)]


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        description="a string, a list of strings, a list of token ids (integers from 0) or a list of such lists"
    )
    logprobs: int | None = Field(None, ge=0, le=MAX_INT32)


REQUEST_MODELS: dict[str, type[_SamplingFields]] = {
    "chat": ChatCompletionRequest,
    "completion": CompletionRequest,
}


class OpenAIError(Exception):
    """An error the client sees as OpenAI's `{"error": {...}}` body with an HTTP status."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "invalid_request_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        503: "service_unavailable",
    }

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    return OpenAIError.TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type(status), "param": param,
                      "code": code if code is not None else status}}


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_request(kind: str, raw: bytes) -> dict[str, Any]:
    """Decode and check a request body; return it as a dict, or raise OpenAIError(400)."""
    try:
        # NaN and Infinity are Python's extension to JSON; no engine means to receive them.
        body = json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as err:
        raise OpenAIError(400, f"The request body is not valid JSON: {err}. Send a JSON object.") from None
    except RecursionError:
        raise OpenAIError(400, "The request body nests JSON too deeply to read.") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "The request body must be a JSON object.")
    try:
        REQUEST_MODELS[kind].model_validate(body)
    except ValidationError as err:
        raise _invalid(err.errors()[0]) from None
    return body


# Fields that take one of several shapes: pydantic reports every shape that failed, we name the shapes.
SHAPES = {
    name: field.description
    for model in (*REQUEST_MODELS.values(), ChatMessage)
    for name, field in model.model_fields.items()
    if field.description
}


def _is_union_member(part: Any) -> bool:
    # pydantic marks the union member tried in an error's path: 'str', 'list[str]', 'ContentPart', ...
    return isinstance(part, str) and (
        part in ("str", "int", "float", "bool") or "[" in part or "-" in part or part[:1].isupper()
    )


def _invalid(error: dict[str, Any]) -> OpenAIError:
    path = []
    for part in error["loc"]:
        if _is_union_member(part):
            field = str(path[-1]) if path else ""
            param = ".".join(map(str, path))
            return OpenAIError(400, f"Invalid value for '{param}': expected {SHAPES.get(field, 'another type')}.",
                               param=param)
        path.append(part)
    param = ".".join(map(str, path)) or None
    return OpenAIError(400, f"Invalid value for '{param}': {error['msg']}.", param=param)


def message_text(content: Any) -> str:
    """A chat message's content as text: a string, or the text parts of a content-part list."""
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content or ""


def completion_prompts(prompt: Any) -> list[Any]:
    """A completion request's prompts: `prompt` is one prompt (a string or token ids) or a list of them."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return prompt
    return [prompt]


def sse_event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
