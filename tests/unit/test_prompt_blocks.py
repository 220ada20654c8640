"""prompt_blocks.py against vLLM's own code: block hashes against vllm.v1.core.kv_cache_utils (in a process of
its own per environment, as NONE_HASH is vLLM's global and its seed comes from the environment), token ids
against vLLM's request model, message parser and chat template call on the embedded model's tokenizer."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from raystack.models import sources
from raystack.router.prompt_blocks import (
    DEFAULT_SEED, BlockHasher, chat_token_ids, completion_token_ids, engine_seed, load_tokenizer,
    request_block_hashes)

# What the engine computes, run in a fresh Python with the environment under test.
VLLM_CHAIN = """
import json, sys
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core import kv_cache_utils
token_lists, block_size = json.load(sys.stdin)
out = {}
for algorithm in ("sha256", "sha256_cbor"):
    hash_fn = get_hash_fn_by_name(algorithm)
    kv_cache_utils.init_none_hash(hash_fn)
    for name, extra_keys in EXTRA_KEYS.items():
        chains = []
        for tokens in token_lists:
            parent, chain = None, []
            for start in range(0, len(tokens) - block_size + 1, block_size):
                parent = kv_cache_utils.hash_block_tokens(hash_fn, parent, tokens[start:start + block_size],
                                                          extra_keys)
                chain.append(kv_cache_utils.maybe_convert_block_hash(parent))
            chains.append(chain)
        out[f"{algorithm} {name}"] = chains
print(json.dumps(out))
"""
# A plain request's blocks, and a LoRA adapter's in vLLM 0.23's and 0.32's forms.
EXTRA_KEYS = {"plain": None, "lora 0.23": ("sql",), "lora 0.32": (("lora", "sql", "/adapters/sql"),)}


@pytest.mark.parametrize("hash_seed", [None, "0", "random"])  # "random": vLLM takes the word as its seed
def test_block_hashes_are_the_engines_for_both_algorithms_and_seeds(hash_seed):
    pytest.importorskip("vllm")
    rng = random.Random(hash_seed)
    block_size = 16
    token_lists = [[rng.randrange(50_000) for _ in range(n)] for n in (0, 15, 16, 17, 100, 16 * 40 + 3)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    if hash_seed is not None:
        env["PYTHONHASHSEED"] = hash_seed
    script = f"EXTRA_KEYS = {EXTRA_KEYS!r}\n{VLLM_CHAIN}"
    result = subprocess.run([sys.executable, "-c", script], input=json.dumps([token_lists, block_size]),
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    engine = json.loads(result.stdout.strip().splitlines()[-1])
    for algorithm in ("sha256", "sha256_cbor"):
        hasher = BlockHasher(block_size, algorithm, engine_seed(env))
        for name, extra_keys in EXTRA_KEYS.items():
            key = f"{algorithm} {name}"
            assert [hasher.hashes(tokens, extra_keys) for tokens in token_lists] == engine[key], key
    assert [len(chain) for chain in engine["sha256 plain"]] == [0, 0, 1, 1, 6, 40]  # full blocks only
    assert engine["sha256 plain"][-1][0] != engine["sha256 lora 0.32"][-1][0]


def test_the_seed_is_the_engines_hashseed_else_vllms_default():
    assert engine_seed({}) == DEFAULT_SEED == "vllm-none-hash"
    assert engine_seed({"PYTHONHASHSEED": "0"}) == "0"
    tokens = list(range(64))
    assert BlockHasher(16, seed="0").hashes(tokens) != BlockHasher(16).hashes(tokens)
    with pytest.raises(ValueError, match="xxhash"):
        BlockHasher(16, "xxhash")


def test_a_shared_prefix_shares_its_leading_hashes():
    hasher = BlockHasher(4)
    a, b = hasher.hashes([1, 2, 3, 4, 5, 6, 7, 8, 9]), hasher.hashes([1, 2, 3, 4, 5, 6, 7, 0])
    assert len(a) == len(b) == 2 and a[0] == b[0] and a[1] != b[1]


# --- token ids ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir():
    path = sources.locate("smollm2-135m-instruct")
    if path is None:
        pytest.skip("the embedded model is not prepared (raystack models prepare)")
    return path


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def vllm_chat(model_dir):
    """vLLM's way from a chat request body to prompt token ids, from its own parts: the request model, its
    chat and tokenize params, the message parser with the content format it detects, the chat template call
    (renderers/online_renderer.py preprocess_chat: tools and tokenize=False as defaults), then the text
    tokenized with the request's encode arguments (renderers/base.py _tokenize_prompt)."""
    pytest.importorskip("vllm")
    from transformers import AutoTokenizer
    from vllm.config import ModelConfig
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.renderers.chat_utils import parse_chat_messages
    from vllm.renderers.hf import resolve_chat_template_content_format, safe_apply_chat_template
    from vllm.renderers.params import merge_kwargs

    model_config = ModelConfig(model=str(model_dir))
    tok = AutoTokenizer.from_pretrained(model_dir)

    def render(body: dict) -> list[int]:
        request = ChatCompletionRequest.model_validate({"model": "m", **body})
        tools = [tool.model_dump() for tool in request.tools] if request.tools is not None else None
        params = request.build_chat_params(None, "auto").with_defaults(
            merge_kwargs(None, dict(tools=tools, tokenize=False)))
        content_format = resolve_chat_template_content_format(None, tools, "auto", tok, model_config=model_config)
        conversation, _, _ = parse_chat_messages(request.messages, model_config, content_format)
        text = safe_apply_chat_template(model_config, tok, conversation, **params.get_apply_chat_template_kwargs())
        return tok(text, **request.build_tok_params(model_config).get_encode_kwargs())["input_ids"]

    return render


SYSTEM = "You are the operations assistant of an Ascend NPU cluster. Answer briefly and exactly. " * 4
CARD = {"type": "object", "properties": {"card": {"type": "integer"}}}
TOOLS = [{"type": "function", "function": {"name": "npu_smi", "description": "A card's state", "parameters": CARD}},
         {"type": "function", "function": {"name": "reboot", "parameters": {"type": "object"}, "strict": True}}]
CHATS = {
    "plain": {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "How many cards?"}]},
    "parts": {"messages": [{"role": "system", "content": [{"type": "text", "text": SYSTEM},
                                                          {"type": "text", "text": "Be terse."}]},
                           {"role": "user", "content": [{"type": "text", "text": "Which driver?"}]}]},
    "no system": {"messages": [{"role": "user", "content": "Hello", "name": "ops"}]},
    "tools and calls": {"tools": TOOLS, "messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Is card 3 healthy?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "npu_smi", "arguments": '{"card": 3}'}},
            {"id": "c2", "type": "function", "function": {"name": "reboot", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "Health: OK"}]},
        {"role": "tool", "tool_call_id": "c2", "content": "not rebooted"},
        {"role": "user", "content": "Thanks."}]},
    "no generation prompt": {"add_generation_prompt": False,
                             "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]},
    "continue": {"add_generation_prompt": False, "continue_final_message": True,
                 "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]},
    "special tokens": {"add_special_tokens": True, "messages": [{"role": "user", "content": "Hi"}]},
    "template kwargs": {"chat_template_kwargs": {"enable_thinking": False}, "reasoning_effort": "low",
                        "messages": [{"role": "user", "content": "Hi"}]},
}


@pytest.mark.parametrize("name", CHATS)
def test_chat_token_ids_are_vllms(name, tokenizer, vllm_chat):
    body = CHATS[name]
    assert chat_token_ids(tokenizer, body) == vllm_chat(body)


def test_requests_with_extra_keys_or_unreproduced_parts_get_no_blocks(tokenizer):
    hasher = BlockHasher(16)
    plain = CHATS["plain"]
    assert request_block_hashes(hasher, tokenizer, "chat", plain)  # a long system prompt: several blocks
    assert request_block_hashes(hasher, tokenizer, "chat", plain, lora=True) == []
    for extra in ({"cache_salt": "tenant-1"}, {"chat_template": "{{ messages }}"}, {"truncate_prompt_tokens": 8},
                  {"chat_template_kwargs": {"tokenize": True}}):
        assert request_block_hashes(hasher, tokenizer, "chat", {**plain, **extra}) == [], extra
    image = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": SYSTEM}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}]}
    assert chat_token_ids(tokenizer, image) is None
    assert chat_token_ids(tokenizer, {"messages": [{"role": "developer", "content": SYSTEM}]}) is None
    billed = {"messages": [{"role": "system", "content": "x-anthropic-billing-header: cch=1\n" + SYSTEM}]}
    assert chat_token_ids(tokenizer, billed) is None  # a line vLLM's versions treat differently


def test_completion_token_ids_are_vllms(tokenizer, model_dir):
    """vLLM tokenizes a completion prompt with add_special_tokens=True unless the request says otherwise
    (renderers/base.py default_cmpl_tok_params); token-id prompts go in as given."""
    pytest.importorskip("vllm")
    from vllm.config import ModelConfig
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    model_config = ModelConfig(model=str(model_dir))
    for body in ({"prompt": SYSTEM}, {"prompt": [SYSTEM]}, {"prompt": SYSTEM, "add_special_tokens": False}):
        request = CompletionRequest.model_validate({"model": "m", **body})
        encode = request.build_tok_params(model_config).get_encode_kwargs()
        assert completion_token_ids(tokenizer, body) == tokenizer(SYSTEM, **encode)["input_ids"], body
    assert completion_token_ids(tokenizer, {"prompt": [5, 6, 7]}) == [5, 6, 7]
    assert completion_token_ids(tokenizer, {"prompt": ["a", "b"]}) is None  # a batch: no one prompt to route


@pytest.mark.parametrize("content_format", ["string", "openai"])
def test_conversations_are_vllms_in_both_content_formats(content_format, model_dir):
    """The messages as vLLM's parser hands them to a template, for templates of either kind (the embedded
    model's is a "string" one: token ids for "openai" are not compared above)."""
    pytest.importorskip("vllm")
    from vllm.config import ModelConfig
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.renderers.chat_utils import parse_chat_messages

    from raystack.router.prompt_blocks import _conversation

    model_config = ModelConfig(model=str(model_dir))
    for name, body in CHATS.items():
        request = ChatCompletionRequest.model_validate({"model": "m", **body})
        expected, _, _ = parse_chat_messages(request.messages, model_config, content_format)
        assert _conversation(body["messages"], content_format) == expected, name
