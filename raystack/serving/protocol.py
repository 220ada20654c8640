"""OpenAI wire protocol at the router: request shapes it checks, error bodies, SSE framing.

The router checks what every engine needs (a model name, the shape of messages and the common sampling
fields) so a malformed request gets a 400 before it costs an engine anything. Everything else passes
through to the engine untouched (extra keys are allowed: vLLM's own parameters such as `ignore_eos`).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1, le=128)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]


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


def error_body(status: int, message: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    err_type = OpenAIError.TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": err_type, "param": param, "code": code if code is not None else status}}


def parse_request(kind: str, raw: bytes) -> dict[str, Any]:
    """Decode and check a request body; return it as a dict, or raise OpenAIError(400)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise OpenAIError(400, f"The request body is not valid JSON: {err}. Send a JSON object.") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "The request body must be a JSON object.")
    try:
        REQUEST_MODELS[kind].model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise OpenAIError(400, f"Invalid value for '{param}': {first['msg']}.", param=param) from None
    return body


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
