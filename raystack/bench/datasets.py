"""Prompts for `raystack bench`: random lengths, one fixed prompt, or a JSONL file.

A prompt is sent as a chat message (`--api chat`) or a completion prompt (`--api completions`), with its
own `max_tokens`. Random prompts are random words, or, given a tokenizer, random token ids decoded to
text as vLLM's own benchmark builds them, so `--input-len` counts the model's tokens.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The classic reasoning puzzle GPUStack's vLLM-vs-MindIE comparison asks at every concurrency.
CHICKEN_AND_RABBIT = (
    "A cage holds chickens and rabbits: 35 heads and 94 legs in all. How many chickens and how many "
    "rabbits are in the cage? Reason step by step, then give both numbers."
)

WORDS = (
    "time person year way day thing man world life hand part child eye woman place work week case point "
    "government company number group problem fact river mountain engine signal harbor lantern garden "
    "window letter market story music paper water energy light table voice field winter summer doctor"
).split()


class DatasetError(ValueError):
    """A dataset that cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class Prompt:
    """One request's input: chat `messages` (or their text as a completion prompt) and its max_tokens."""

    messages: list[dict[str, Any]]
    max_tokens: int | None

    @property
    def text(self) -> str:
        return "\n".join(str(m.get("content") or "") for m in self.messages)


def _user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def _lengths(rng: random.Random, n: int, mean: int, range_ratio: float) -> list[int]:
    """n lengths uniform in mean x [1 - range_ratio, 1 + range_ratio] (vLLM's --random-range-ratio)."""
    low, high = max(1, round(mean * (1 - range_ratio))), max(1, round(mean * (1 + range_ratio)))
    return [rng.randint(low, high) for _ in range(n)]


def random_prompts(n: int, input_len: int, output_len: int, range_ratio: float = 0.0, seed: int = 0,
                   tokenizer: Any = None) -> list[Prompt]:
    if not 0 <= range_ratio < 1:
        raise DatasetError(f"--range-ratio must be in [0, 1), not {range_ratio}")
    rng = random.Random(seed)
    inputs = _lengths(rng, n, input_len, range_ratio)
    outputs = _lengths(rng, n, output_len, range_ratio)
    prompts = []
    for length, max_tokens in zip(inputs, outputs):
        if tokenizer is not None:
            # Random ids from the ordinary vocabulary (special tokens would change the template's meaning).
            ids = [rng.randrange(100, tokenizer.vocab_size) for _ in range(length)]
            text = tokenizer.decode(ids)
        else:
            text = " ".join(rng.choice(WORDS) for _ in range(length))
        prompts.append(Prompt(_user(text), max_tokens))
    return prompts


def fixed_prompts(n: int, text: str, output_len: int | None) -> list[Prompt]:
    return [Prompt(_user(text), output_len) for _ in range(n)]


def jsonl_prompts(path: str | Path, n: int, output_len: int | None, seed: int = 0) -> list[Prompt]:
    """Lines of {"prompt": "..."} or {"messages": [...]}, optionally with "max_tokens"; n drawn in turn
    (the file repeats when n is larger), shuffled by the seed."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file (--dataset-path)")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise DatasetError(f"{path}:{number}: not JSON ({err})") from None
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            messages = _user(row["prompt"])
        elif isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]:
            messages = row["messages"]
        else:
            raise DatasetError(f'{path}:{number}: expected {{"prompt": "..."}} or {{"messages": [...]}}')
        max_tokens = row.get("max_tokens", output_len)
        rows.append(Prompt(messages, max_tokens))
    if not rows:
        raise DatasetError(f"{path}: no prompts in the file")
    random.Random(seed).shuffle(rows)
    return [rows[i % len(rows)] for i in range(n)]
