"""A request's prompt blocks as vLLM's prefix cache keys them: its token ids, and the chained hash of each
full block, so the router can ask KvIndex (kv_index.py) how much of a prompt a replica holds.

Token ids, as vLLM's OpenAI server makes them (0.23 and 0.32 alike):
  - chat: the messages become a "conversation" (vllm/renderers/chat_utils.py parse_chat_messages: in the
    "string" content format a text part list is joined with "\\n"; in the "openai" format, for templates that
    loop over content parts, each text part stays a {"type": "text"} part; tool results' parts are joined
    either way; assistant tool-call arguments are parsed from JSON into objects). The tokenizer's chat
    template renders them to text (vllm/renderers/hf.py safe_apply_chat_template, called with
    tokenize=False by the online renderer's preprocess_chat), and the text is tokenized like any prompt,
    with add_special_tokens as the request says (False by default: the template writes its own). The
    template's keyword arguments are the request's chat_template_kwargs overridden by
    add_generation_prompt, continue_final_message, documents and reasoning_effort where those are set
    (ChatCompletionRequest.build_chat_params, renderers/params.py merge_kwargs), and the request's tools,
    each as vLLM's request model dumps it (type, then function: name, description, parameters, and any
    other key). Where the versions part, this follows 0.32: a tool call's arguments that are not a JSON
    object become {} (0.23 refuses invalid JSON and keeps a non-object value);
  - completion: the prompt string tokenized with add_special_tokens (True unless the request says
    otherwise: BaseRenderer.default_cmpl_tok_params), or the prompt's token ids as given.
A chat template raystack gives vLLM is the model directory's own (models/embedded.py writes it there), so a
tokenizer loaded from the same directory renders the same.

Block hashes, as vllm/v1/core/kv_cache_utils.py hash_block_tokens computes them: block i covers tokens
[i * block_size, (i + 1) * block_size), only full blocks count, and its hash is
    H((parent, tuple(block tokens), extra_keys))
with `parent` the previous block's digest, NONE_HASH = H(seed) for the first, and H one of
vllm/utils/hashing.py's: sha256 (pickle, highest protocol, then SHA-256; the default) or sha256_cbor
(canonical CBOR, then SHA-256). The seed (init_none_hash):
  - vLLM 0.32: PYTHONHASHSEED when the engine has it set, else "vllm-none-hash" for these two algorithms;
  - vLLM 0.23: PYTHONHASHSEED when set, else NONE_HASH is 32 random bytes per engine process, whatever the
    algorithm: no other process can compute its hashes, so an engine meant for KV-aware routing must run
    with PYTHONHASHSEED set (and the router be told its value).
The hashes are given in kv_events.block_hash_int's form, the one KvIndex stores.

Requests whose blocks carry extra keys get no blocks from request_block_hashes: LoRA adapters (0.23 keys
every block by the adapter's name, 0.32 by ("lora", name, path): BlockHasher takes either, for a caller
that knows the engine's adapter path), cache_salt, multimodal parts, prompt embeddings. They are routed
by the fallback policy. The xxhash algorithms are not offered: vLLM gives them a random seed
unless PYTHONHASHSEED is set, and they need a package raystack does not install.
pickle's output for ints, bytes and tuples is the same on every Python raystack runs (protocol 5); a Ray
cluster runs one Python minor version on all its nodes anyway.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from typing import Any, Callable, Mapping, Sequence

from raystack.router.kv_events import block_hash_int

DEFAULT_SEED = "vllm-none-hash"  # vLLM 0.32 kv_cache_utils.DEFAULT_NONE_HASH_SEED
HASH_ALGORITHMS = ("sha256", "sha256_cbor")  # vLLM's CacheConfig.prefix_caching_hash_algo values served


def _sha256_pickle(value: Any) -> bytes:
    return hashlib.sha256(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def _sha256_cbor(value: Any) -> bytes:
    import cbor2  # only for engines set to sha256_cbor

    return hashlib.sha256(cbor2.dumps(value, canonical=True)).digest()


_HASH_FUNCTIONS: dict[str, Callable[[Any], bytes]] = {"sha256": _sha256_pickle, "sha256_cbor": _sha256_cbor}


def engine_seed(engine_env: Mapping[str, str]) -> str:
    """The NONE_HASH seed of an engine (vLLM 0.32, or 0.23 with PYTHONHASHSEED) run with `engine_env`."""
    return engine_env.get("PYTHONHASHSEED", DEFAULT_SEED)


class BlockHasher:
    """The engine's block hashes for token ids: `algorithm` is its prefix_caching_hash_algo, `seed` its
    NONE_HASH seed (engine_seed), `block_size` its cache block size in tokens."""

    def __init__(self, block_size: int, algorithm: str = "sha256", seed: str = DEFAULT_SEED):
        if algorithm not in _HASH_FUNCTIONS:
            raise ValueError(f"prefix caching hash {algorithm!r}: only {', '.join(HASH_ALGORITHMS)} can be "
                             "computed outside the engine")
        self.block_size = block_size
        self.algorithm = algorithm
        self._hash = _HASH_FUNCTIONS[algorithm]
        self.none_hash = self._hash(seed)

    def digests(self, token_ids: Sequence[int], extra_keys: tuple | None = None) -> list[bytes]:
        """The engine's digest of each full block, chained from NONE_HASH. `extra_keys`: what the engine adds
        to every block of the request, None for a plain request; a LoRA adapter's request has
        (name,) in vLLM 0.23 and (("lora", name, path),) in 0.32, `path` the adapter's directory as the
        engine loaded it (kv_cache_utils._gen_lora_extra_hash_keys)."""
        size = self.block_size
        parent = self.none_hash
        out = []
        for start in range(0, len(token_ids) - size + 1, size):
            parent = self._hash((parent, tuple(token_ids[start:start + size]), extra_keys))
            out.append(parent)
        return out

    def hashes(self, token_ids: Sequence[int], extra_keys: tuple | None = None) -> list[int]:
        """The blocks' hashes in the form KV events and KvIndex use."""
        return [block_hash_int(digest) for digest in self.digests(token_ids, extra_keys)]


# --- token ids -------------------------------------------------------------------------------------------

# Request fields that add extra keys to the engine's block hashes, or change what it tokenizes in ways not
# reproduced here: such requests get no blocks.
_UNHASHED_FIELDS = ("cache_salt", "chat_template", "prompt_embeds", "mm_processor_kwargs",
                    "truncate_prompt_tokens")
_CLAUDE_CODE_HEADER = "x-anthropic-billing-header"
# Template arguments vLLM refuses from a request (hf.resolve_chat_template_kwargs).
_REFUSED_TEMPLATE_KWARGS = {"chat_template", "tokenize"}


def _texts(content: Any) -> list[str] | None:
    """A message content's text parts; None if it has another kind of part."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            return None  # an image, audio, video or file part: multimodal extra keys
    return texts


def _tool_calls(calls: list[dict]) -> list[dict]:
    """Assistant tool calls with their arguments as objects (chat_utils._postprocess_messages)."""
    out = []
    for call in calls:
        function = dict(call.get("function") or {})
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = {}
        function["arguments"] = arguments if isinstance(arguments, dict) else {}
        out.append({**call, "function": function})
    return out


def _conversation(messages: Sequence[Mapping[str, Any]], content_format: str) -> list[dict] | None:
    conversation = []
    for message in messages:
        role = message.get("role")
        if role == "developer":
            return None  # vLLM may turn it into a system message, depending on the template
        texts = _texts(message.get("content"))
        if texts is None:
            return None
        if role == "system" and any(text.startswith(_CLAUDE_CODE_HEADER) for text in texts):
            return None  # vLLM 0.32 strips this line, 0.23 does not (chat_utils._strip_claude_code_billing_header)
        content: Any = "\n".join(texts)
        if content_format == "openai" and role != "tool":
            content = [{"type": "text", "text": text} for text in texts]
        turn: dict[str, Any] = {"role": role, "content": content}
        if role == "assistant":
            if message.get("tool_calls"):
                turn["tool_calls"] = _tool_calls(message["tool_calls"])
            if message.get("reasoning") is not None:
                turn["reasoning"] = turn["reasoning_content"] = message["reasoning"]
        elif role == "tool" and "tool_call_id" in message:
            turn["tool_call_id"] = message["tool_call_id"]
        if isinstance(message.get("name"), str):
            turn["name"] = message["name"]
        conversation.append(turn)
    return conversation


def _tools(tools: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Each tool as vLLM's ChatCompletionToolsParam.model_dump() gives it to the template."""
    out = []
    for tool in tools:
        function = dict(tool.get("function") or {})
        described = {"name": function.pop("name", None), "description": function.pop("description", None),
                     "parameters": function.pop("parameters", None)}
        out.append({"type": tool.get("type", "function"), "function": {**described, **function}})
    return out


def chat_token_ids(tokenizer: Any, body: Mapping[str, Any], content_format: str = "string",
                   default_template_kwargs: Mapping[str, Any] | None = None) -> list[int] | None:
    """The prompt token ids vLLM's chat serving gives the engine for this request body (a chat completion
    request as JSON); None for a request this module does not reproduce. `tokenizer`: a transformers
    tokenizer loaded from the model directory the engine serves; `content_format`: "string", or "openai"
    for a template vLLM finds looping over content parts (renderers/hf.py
    resolve_chat_template_content_format; not detected here); `default_template_kwargs`: the server's
    --default-chat-template-kwargs, if any."""
    if any(body.get(field) for field in _UNHASHED_FIELDS):
        return None
    conversation = _conversation(body.get("messages") or [], content_format)
    if not conversation:
        return None
    user_kwargs = dict(body.get("chat_template_kwargs") or {})
    if _REFUSED_TEMPLATE_KWARGS & user_kwargs.keys():
        return None
    request_kwargs = {
        "add_generation_prompt": body.get("add_generation_prompt", True),
        "continue_final_message": body.get("continue_final_message", False),
        "documents": body.get("documents"),
        "reasoning_effort": body.get("reasoning_effort"),
    }
    if body.get("reasoning_effort") is not None and "enable_thinking" not in user_kwargs:
        request_kwargs["enable_thinking"] = body["reasoning_effort"] != "none"
    # renderers/params.py merge_kwargs: the request's own fields win, unless None or "auto".
    kwargs = {**(default_template_kwargs or {}), **user_kwargs,
              **{k: v for k, v in request_kwargs.items() if v not in (None, "auto")}}
    tools = _tools(body["tools"]) if body.get("tools") is not None else None
    try:
        text = tokenizer.apply_chat_template(conversation, tools=tools, tokenize=False, **kwargs)
    except Exception:  # the template refuses the request: the engine will answer it so
        return None
    return tokenizer(text, add_special_tokens=body.get("add_special_tokens", False))["input_ids"]


def completion_token_ids(tokenizer: Any, body: Mapping[str, Any]) -> list[int] | None:
    """The prompt token ids vLLM's completion serving gives the engine; None for a batch of prompts or a
    request this module does not reproduce."""
    if any(body.get(field) for field in _UNHASHED_FIELDS):
        return None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=body.get("add_special_tokens", True))["input_ids"]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    return None


def request_block_hashes(hasher: BlockHasher, tokenizer: Any, kind: str, body: Mapping[str, Any],
                         lora: bool = False, content_format: str = "string") -> list[int]:
    """The block hashes of a request (`kind` "chat" or "completion"): empty when it has none to match (a
    prompt under one block, a LoRA adapter's request, a request not reproduced)."""
    if lora:
        return []
    if kind == "chat":
        ids = chat_token_ids(tokenizer, body, content_format)
    else:
        ids = completion_token_ids(tokenizer, body)
    # The blocks a cache hit can cover: the engine always computes the prompt's last token (for its logits),
    # so a prompt of whole blocks gets its last one recomputed (v1/core/kv_cache_manager.py
    # get_computed_blocks: max_cache_hit_length = num_tokens - 1).
    return hasher.hashes(ids[:-1]) if ids else []


def load_tokenizer(model_dir: str | os.PathLike) -> Any:
    """The tokenizer vLLM loads for a model directory (its chat template included)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
