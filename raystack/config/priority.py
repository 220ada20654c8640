"""Priority classes (the router's `priority` block): the bands a request may belong to, most urgent first.

    priority:
      default: standard          # the class of a request whose key names none, or with no key at all
      classes:                   # in order: a full backend admits waiting requests band by band
        - name: interactive
        - name: standard
        - name: batch
          sheddable: true        # refused first (429, Retry-After) when the backend is saturated
          max_share: 0.75        # at most this share of a backend's slots at once: the rest stay free for
                                 # the classes above, since an engine never preempts a running request for them
          max_queued: 256        # requests of the class that may wait for a backend (per router replica)
          queue_timeout_s: 600   # the longest one waits for a slot; then 503 with Retry-After

A class's position is also what vLLM's scheduler sees: the request's `priority` is 0 for the first class,
1 for the next (vLLM serves lower values first; the Gateway API Inference Extension and llm-d count the other
way). A key in the keys file names its class (`priority: batch`); a request may ask for a class of its own
(header x-raystack-priority, or vLLM's integer in `priority`), never above its key's (router/priority.py).
"""

from __future__ import annotations

from pydantic import Field, model_validator

from raystack.config.strict import NAME_PATTERN, Strict, require_unique


class PriorityClass(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    sheddable: bool = Field(
        False, description="refused first when the backend is saturated: on arrival while a request of a "
        "non-sheddable class waits, and from the queue as soon as one starts waiting (429, Retry-After)"
    )
    max_share: float = Field(
        1.0, gt=0, le=1, description="the most of a backend's slots this class's requests hold at once; the rest "
        "stay free for the classes above it (slots: each replica's max_ongoing_requests, or the engine's running "
        "limit if lower, e.g. vLLM's max_num_seqs)"
    )
    max_queued: int | None = Field(
        None, ge=0, description="requests of this class that may wait for a full backend, per router replica "
        "(default: the backend's max_queued_requests); beyond it 429"
    )
    queue_timeout_s: float | None = Field(
        None, gt=0, description="the longest a request of this class waits for a slot of a full backend before "
        "503 with Retry-After (default: router.first_token_timeout_s, then 504)"
    )


DEFAULT_CLASSES = [
    PriorityClass(name="interactive"),
    PriorityClass(name="standard"),
    PriorityClass(name="batch", sheddable=True, max_share=0.75),
]


class PriorityClasses(Strict):
    default: str = Field("standard", description="the class of requests whose key names none, or without a key")
    classes: list[PriorityClass] = Field(
        default_factory=lambda: list(DEFAULT_CLASSES), min_length=1,
        description="the bands, most urgent first; a class's position is the `priority` vLLM's scheduler gets"
    )

    @model_validator(mode="after")
    def _consistent(self) -> PriorityClasses:
        names = [c.name for c in self.classes]
        require_unique("priority class names", names)
        if self.default not in names:
            raise ValueError(f"default class {self.default!r} is not among the classes: {', '.join(names)}")
        if all(c.sheddable for c in self.classes):
            raise ValueError("every class is sheddable: leave at least one that is never refused first")
        return self

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]
