"""A request's priority class (config/priority.py): its key's class is the highest it may have, and the
request may ask for a lower one, never a higher one.

    x-raystack-priority: batch     the class by name (a header: any OpenAI client can send it)
    "priority": 2                  or vLLM's integer in the body: the class at that position, lower served
                                   first (beyond the last class: the last)

A request without a key has the router's default class as its highest. Asking above what the key allows is
not an error: the request keeps its key's class, and the answer's x-raystack-priority header says which
class served it. An engine that schedules by priority (vLLM) gets the class's position as `priority`; one
that does not (MindIE) gets no such field, and the router's queue alone orders its requests. (MindIE's
OpenAI endpoints read no priority: only its own /infer API takes one, in parameters.priority, 1-5;
MindIE-LLM's OpenAI request parsers never assign it.) No client header reaches an engine: the replica calls
vLLM's serving layer without the HTTP request, so vLLM 0.32's X-Vllm-Priority cannot bypass the class.
"""

from __future__ import annotations

from typing import Any

from raystack.config.priority import PriorityClasses
from raystack.protocol import OpenAIError
from raystack.router.fair_share import Band

HEADER = "x-raystack-priority"


class Priorities:
    """The router's classes as the bands its gates serve, and each request's."""

    def __init__(self, config: PriorityClasses):
        self.bands = [Band(rank=rank, **c.model_dump()) for rank, c in enumerate(config.classes)]
        self.by_name = {band.name: band for band in self.bands}
        self.default = self.by_name[config.default]

    def of(self, key_class: str | None, header: str | None, body: dict[str, Any]) -> Band:
        """The band of a request whose key has `key_class` (None: the default class), asking with its
        `header` or its body's `priority`; 400 for a class name this router does not know."""
        highest = self.by_name.get(key_class or "", self.default)
        asked = self._asked(header, body)
        return asked if asked is not None and asked.rank > highest.rank else highest

    def _asked(self, header: str | None, body: dict[str, Any]) -> Band | None:
        if header is not None:
            band = self.by_name.get(header.strip())
            if band is None:
                raise OpenAIError(
                    400, f"No priority class {header.strip()!r} ({HEADER} header). This endpoint's classes, most "
                    f"urgent first: {', '.join(self.by_name)}.", param=HEADER, code="invalid_priority")
            return band
        value = body.get("priority")
        if value is None:
            return None
        return self.bands[min(max(value, 0), len(self.bands) - 1)]


def tell_engine(body: dict[str, Any], band: Band, schedules_by_priority: bool) -> None:
    """The class in the engine's terms: vLLM's `priority` (the band's rank), or no such field."""
    if schedules_by_priority:
        body["priority"] = band.rank
    else:
        body.pop("priority", None)
