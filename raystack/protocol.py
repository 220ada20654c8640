"""OpenAI wire protocol at the router: request shapes it checks, error bodies, SSE framing.

The router checks what every engine needs (a model name, the shape of messages and the common sampling
fields) so a malformed request gets a 400 before it costs an engine anything. Everything else passes
through to the engine untouched (extra keys are allowed: vLLM's own parameters such as `ignore_eos`).
Types are strict: `"max_tokens": "5"` is a 400, not a string an engine would choke on later.
"""

from __future__ import annotations

from typing import Annotated, Any, AsyncIterator, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from raystack.json_codec import decode, encode


# Token counts and ids fit in 32 bits in every engine; seeds in 64 (vLLM's bounds).
MAX_INT32 = 2**31 - 1
INT64 = (-(2**63), 2**63 - 1)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


TokenId = Annotated[int, Field(ge=0, le=MAX_INT32)]
Count = Annotated[int, Field(ge=0, le=MAX_INT32)]
Int64 = Annotated[int, Field(ge=INT64[0], le=INT64[1])]
JSONObject = dict[str, Any]


class StreamOptions(_Open):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class ResponseFormat(_Open):
    type: str = Field(min_length=1, description="text, json_object, json_schema, ...")
    json_schema: JSONObject | None = None


class _SamplingFields(_Open):
    """Every field both endpoints share, OpenAI's and vLLM's sampling extras (vLLM's
    entrypoints/openai protocol), typed as the engines read them: a value an engine could not use is a
    400 naming its `param` here, never an engine's crash."""

    model: str = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    n: int | None = Field(None, ge=1, le=128)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    stop: str | list[str] | None = Field(None, description="a string or a list of strings")
    seed: Int64 | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # vLLM's sampling extras (MindIE reads the same names where it has them).
    top_k: int | None = Field(None, ge=-1, le=MAX_INT32)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    length_penalty: float | None = None
    use_beam_search: bool | None = None
    stop_token_ids: list[TokenId] | None = None
    allowed_token_ids: list[TokenId] | None = None
    bad_words: list[str] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    min_tokens: Count | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1, le=MAX_INT32)
    truncation_side: Literal["left", "right"] | None = None
    prompt_logprobs: int | None = Field(None, ge=-1, le=MAX_INT32)
    add_special_tokens: bool | None = None
    structured_outputs: JSONObject | None = None
    priority: Int64 | None = None
    request_id: str | None = None
    cache_salt: str | None = Field(None, min_length=1, max_length=1024)
    return_token_ids: bool | None = None
    return_tokens_as_token_ids: bool | None = None
    thinking_token_budget: int | None = Field(None, ge=-1, le=MAX_INT32)
    stream_interval: int | None = Field(None, ge=1, le=MAX_INT32)
    kv_transfer_params: JSONObject | None = None
    vllm_xargs: JSONObject | None = None


class ContentPart(_Open):
    type: str = Field(min_length=1, description="text, image_url, ...")
    text: str | None = None


class FunctionCall(_Open):
    name: str = Field(min_length=1)
    arguments: str | None = None


class ToolCall(_Open):
    id: str | None = None
    type: str | None = None
    function: FunctionCall


class ChatMessage(_Open):
    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    content: str | list[ContentPart] | None = Field(
        None, description='a string, a list of content parts ({"type": "text", "text": ...}) or null'
    )
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionSpec(_Open):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: JSONObject | None = None


class Tool(_Open):
    type: str = Field(min_length=1, description="function")
    function: FunctionSpec


class NamedToolChoice(_Open):
    type: str = Field(min_length=1)
    function: FunctionSpec


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_INT32)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description='"none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
    )
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None
    include_reasoning: bool | None = None
    echo: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    documents: list[dict[str, str]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: JSONObject | None = None
    mm_processor_kwargs: JSONObject | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    modalities: list[str] | None = None
    service_tier: str | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        description="a string, a list of strings, a list of token ids (integers from 0) or a list of such lists"
    )
    logprobs: int | None = Field(None, ge=0, le=MAX_INT32)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=128)


CHAT_ONLY_FIELDS = ("tools", "tool_choice", "parallel_tool_calls")

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
        headers: dict[str, str] | None = None, type: str | None = None,
    ):
        super().__init__(message)
        self.type = type  # OpenAI's error type, when not the status's (insufficient_quota)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code, self.type)


def error_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    return OpenAIError.TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str, param: str | None = None, code: str | int | None = None,
               type: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type or error_type(status), "param": param,
                      "code": code if code is not None else status}}


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_request(kind: str, raw: bytes) -> dict[str, Any]:
    """Decode and check a request body; return it as a dict, or raise OpenAIError(400)."""
    try:
        # NaN and Infinity are Python's extension to JSON; no engine means to receive them.
        body = decode(raw, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as err:
        raise OpenAIError(400, f"The request body is not valid JSON: {err}. Send a JSON object.") from None
    except RecursionError:
        raise OpenAIError(400, "The request body nests JSON too deeply to read.") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "The request body must be a JSON object.")
    if kind == "completion":
        for field in CHAT_ONLY_FIELDS:
            if body.get(field) is not None:  # OpenAI refuses them here too; vLLM would drop them without a word
                raise OpenAIError(400, f"`{field}` is a chat completions field: /v1/completions calls no tools. "
                                       f"Send `messages` with `{field}` to /v1/chat/completions.", param=field)
    try:
        request = REQUEST_MODELS[kind].model_validate(body)
    except ValidationError as err:
        raise _invalid(err.errors()[0]) from None
    check_schemas(request)
    return body


def check_schemas(request: _SamplingFields) -> None:
    """What the shapes alone do not say about tools and structured output, checked here for every engine
    (an engine would fail later, or differently): a tool_choice needs tools and, naming a function, one of
    them; every tool's `parameters` and a json_schema response's `schema` must be JSON Schema."""
    tools = getattr(request, "tools", None) or []
    for i, tool in enumerate(tools):
        _check_json_schema(tool.function.parameters, f"tools.{i}.function.parameters")
    choice = getattr(request, "tool_choice", None)
    if choice not in (None, "none") and not tools:
        raise OpenAIError(400, "tool_choice is set but no tools are given. Send `tools`, or leave tool_choice out.",
                          param="tool_choice")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in tools}:
        raise OpenAIError(400, f"tool_choice names the function `{choice.function.name}`, which is not in `tools` "
                               f"({', '.join(t.function.name for t in tools)}).", param="tool_choice")
    response_format = request.response_format
    if response_format is not None and response_format.type == "json_schema":
        schema = (response_format.json_schema or {}).get("schema")
        if not isinstance(schema, dict):
            raise OpenAIError(400, "response_format json_schema needs `json_schema.schema`, a JSON Schema object.",
                              param="response_format.json_schema.schema")
        _check_json_schema(schema, "response_format.json_schema.schema")


def _check_json_schema(schema: Any, param: str) -> None:
    if schema is None:
        return
    import jsonschema  # Ray's own dependency

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as err:
        where = "/".join(map(str, err.absolute_path))
        raise OpenAIError(400, f"{param} is not a valid JSON Schema: {err.message}"
                               + (f" (at {where})" if where else "") + ".", param=param) from None
    except RecursionError:
        raise OpenAIError(400, f"{param} nests too deeply to check.", param=param) from None


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


def tool_choice_of(body: dict[str, Any]) -> str | None:
    """How a parsed request asks for tools: None (it sends none), "none", "auto", "required" or "named"
    (a function). OpenAI: with tools and no tool_choice, the model chooses ("auto")."""
    if not body.get("tools"):
        return None
    choice = body.get("tool_choice") or "auto"
    return "named" if isinstance(choice, dict) else choice


def response_format_of(body: dict[str, Any]) -> str | None:
    """The structured output a parsed request asks for: "json_object", "json_schema", or None (text)."""
    kind = (body.get("response_format") or {}).get("type")
    return None if kind in (None, "text") else kind


# A thinking model's reasoning comes back as `reasoning` from vLLM (0.23 and 0.32: its DeltaMessage) and as
# `reasoning_content` from MindIE (and DeepSeek's API); clients read one or the other. Every answer through
# raystack carries both, so a client works whichever backend served it.
REASONING_FIELDS = ("reasoning", "reasoning_content")


def name_reasoning_both_ways(answer: dict[str, Any]) -> bool:
    """Give each choice's message or delta the reasoning field it lacks; True if any changed."""
    changed = False
    for choice in answer.get("choices") or []:
        message = choice.get("message") or choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            continue
        text = next((message[f] for f in REASONING_FIELDS if message.get(f) is not None), None)
        for field in REASONING_FIELDS:
            if text is not None and message.get(field) is None:
                message[field] = text
                changed = True
    return changed


async def stream_reasoning_both_ways(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """An SSE stream whose chunks carry both reasoning fields (only chunks with reasoning are rewritten)."""
    async for event in events:
        if '"reasoning' in event and event.startswith("data: {"):
            chunk = decode(event[6:])
            if name_reasoning_both_ways(chunk):
                event = sse_event(chunk)
        yield event


def message_text(content: Any) -> str:
    """A chat message's content as text: a string, or the text parts of a content-part list."""
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content or ""


def prompt_text(kind: str, body: dict[str, Any]) -> str:
    """The prompt as one string in message order, so a shared conversation start is a shared prefix (what
    prefix routing matches, and what the router's token estimate counts). A batch of completion prompts is
    its prompts in order; token ids are written as numbers."""
    if kind == "chat":
        return "".join(f"\x1e{m.get('role')}\x1f{message_text(m.get('content'))}" for m in body.get("messages") or [])
    return "\x1e".join(" ".join(map(str, p)) if isinstance(p, list) else str(p or "")
                       for p in completion_prompts(body.get("prompt", "")))


def completion_prompts(prompt: Any) -> list[Any]:
    """A completion request's prompts: `prompt` is one prompt (a string or token ids) or a list of them."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return prompt
    return [prompt]


def sse_event(payload: dict[str, Any]) -> str:
    return f"data: {encode(payload).decode()}\n\n"


SSE_DONE = "data: [DONE]\n\n"
