"""What one answer costs, read as it goes out of the router.

What an answer cost comes from the engine's own `usage`: a whole answer's body, or a stream's last chunk.
Every engine sends that chunk when asked (`stream_options.include_usage`: vLLM, the synthetic engine, and
raystack's MindIE relay), so the router asks for it on every metered stream and takes it out again for a
client that did not ask (`Meter`). A stream the client left before its end has no usage chunk: its
completion is counted as the content events relayed (one token each as engines stream them), its prompt as
the router's estimate at admission. Only events that carry usage are parsed, each once: an error event is
known by its first key, and content events are counted, not read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncIterator

from raystack.json_codec import decode
from raystack.router.usage import Cost

CHARS_PER_TOKEN = 4  # the prompt's estimate at admission, until the engine's usage settles it


def estimate_prompt_tokens(body_bytes: int) -> int:
    """The prompt's tokens, roughly, from the request body's size (the router holds no tokenizer, and the
    body is read already): its bytes / 4. The body is mostly the prompt; what else it holds (tool
    definitions, the chat template's share per message) an engine counts among the prompt tokens too."""
    return body_bytes // CHARS_PER_TOKEN + 1


def _usage_of(event: dict[str, Any]) -> tuple[int, int] | None:
    usage = event.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
        return usage["prompt_tokens"], int(usage.get("completion_tokens") or 0)
    return None


@dataclass
class Meter:
    """The cost of one answer, read as it goes out. `client_wants_usage`: the client asked for the usage
    chunk itself (else the router asked for it, and it is taken out of the stream)."""

    cost: Cost
    client_wants_usage: bool = True

    def whole(self, status: int | None, body: Any) -> None:
        self.cost.error = (status or 200) >= 400
        usage = _usage_of(body) if isinstance(body, dict) else None
        if self.cost.error and not usage:  # refused by the engine: it read the prompt, generated nothing
            self.cost.prompt_tokens = 0
        if usage:
            self.cost.prompt_tokens, self.cost.completion_tokens = usage
            self.cost.settled = True

    async def watch(self, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        """`chunks`, counted; the usage chunk taken out when only the router asked for it."""
        async for chunk in chunks:
            if '"usage"' in chunk or '"error"' in chunk:
                chunk = self._read(chunk)
                if not chunk:
                    continue
            elif not self.cost.settled:
                self.cost.completion_tokens += chunk.count("data: {")
            yield chunk

    def _read(self, chunk: str) -> str:
        """A chunk that mentions usage or an error, event by event: an error event is known by its first key,
        unparsed (an opening's was parsed by the replica's check already); of the rest, only an event that
        mentions usage or an error is parsed."""
        kept = []
        for event in chunk.split("\n\n"):
            if event.startswith('data: {"error"'):
                self.cost.error = True
            elif event.startswith("data: {") and ('"usage"' in event or '"error"' in event):
                if self._parse(event):
                    continue
            elif event.startswith("data: {") and not self.cost.settled:
                self.cost.completion_tokens += 1
            kept.append(event)
        return "\n\n".join(kept)

    def _parse(self, event: str) -> bool:
        """Read one event; True when it is the usage chunk only the router asked for, to be taken out."""
        try:
            data = decode(event[len("data: "):])
        except ValueError:
            return False
        usage = _usage_of(data)
        if "error" in data:
            self.cost.error = True
        elif usage:
            self.cost.prompt_tokens, self.cost.completion_tokens = usage
            self.cost.settled = True
            return not self.client_wants_usage and not data.get("choices")
        elif not self.cost.settled:
            self.cost.completion_tokens += 1
        return False


def ask_for_usage(body: dict[str, Any]) -> bool:
    """Ask the engine for a stream's usage chunk; whether the client had asked for it itself."""
    options = body.get("stream_options") or {}
    wanted = bool(options.get("include_usage"))
    if body.get("stream") and not wanted:
        body["stream_options"] = {**options, "include_usage": True}
    return wanted
