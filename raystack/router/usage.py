"""Usage accounting per API key, model and priority class: what an answer cost (Cost), and the book that keeps it.

The UsageBook holds hourly totals (requests, prompt tokens, completion tokens, errors) per key name, model
and priority class, and is written to Ray's GCS key-value store, one entry per router application and UTC
day, so the totals outlive the router replicas (and the ledger, ledger.py, that keeps the book). The daily
and monthly token budgets are read from it; `raystack usage` reads it back. What each answer cost is read as
it goes out (metering.py).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable

KV_NAMESPACE = "raystack"
KV_PREFIX = "usage:"  # usage:{router application}:{YYYY-MM-DD}
FIELDS = ("requests", "prompt_tokens", "completion_tokens", "errors")


@dataclass
class Cost:
    """What one answer cost, as far as the router knows."""

    prompt_tokens: int
    completion_tokens: int = 0
    error: bool = False
    settled: bool = False  # from the engine's usage (else the prompt is the estimate)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _day(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d")


def day_start(t: float) -> float:
    """The UTC midnight that began `t`'s day."""
    now = datetime.fromtimestamp(t, timezone.utc)
    return datetime(now.year, now.month, now.day, tzinfo=timezone.utc).timestamp()


def next_day(t: float) -> float:
    return day_start(t) + 86400


def month_start(t: float) -> float:
    """The UTC midnight that began `t`'s month."""
    now = datetime.fromtimestamp(t, timezone.utc)
    return datetime(now.year, now.month, 1, tzinfo=timezone.utc).timestamp()


def next_month(t: float) -> float:
    now = datetime.fromtimestamp(t, timezone.utc)
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return datetime(year, month, 1, tzinfo=timezone.utc).timestamp()


# day -> hour -> key -> model -> class -> [requests, prompt_tokens, completion_tokens, errors]
Hours = dict[str, dict[str, dict[str, dict[str, list[int]]]]]
Days = dict[str, Hours]
UNCLASSED = "-"  # the class of usage booked before priority classes (a model's row was the list itself)


def _by_class(hours: Hours) -> Hours:
    """`hours` as stored, with rows booked before classes (model -> row) read as of class UNCLASSED."""
    for keys in hours.values():
        for models in keys.values():
            for model, rows in models.items():
                if isinstance(rows, list):
                    models[model] = {UNCLASSED: rows}
    return hours


@dataclass
class UsageBook:
    """Hourly usage per key, model and priority class of one router application, kept in memory and written to Ray's GCS
    key-value store (`flush`). A day is read back from the store the first time it is needed, so a new
    book (its ledger replaced) goes on from what was written. `store`: None in unit tests of the ledger."""

    app: str
    store: Any = None  # get(key) -> bytes | None, put(key, bytes), keys(prefix) -> list[str]
    days: Days = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)

    def _kv_key(self, day: str) -> str:
        return f"{KV_PREFIX}{self.app}:{day}"

    def _hours(self, day: str) -> Hours:
        """One day's hours, read from the store once (before anything is added to it: nothing is lost)."""
        if day not in self.days:
            stored = self.store.get(self._kv_key(day)) if self.store is not None else None
            self.days[day] = _by_class(json.loads(stored)) if stored else {}
        return self.days[day]

    def add(self, key: str, model: str, cost: Cost, now: float | None = None, priority: str = UNCLASSED) -> None:
        now = time.time() if now is None else now
        day = _day(now)
        hour = datetime.fromtimestamp(now, timezone.utc).strftime("%H")
        row = (self._hours(day).setdefault(hour, {}).setdefault(key, {}).setdefault(model, {})
               .setdefault(priority, [0, 0, 0, 0]))
        for i, value in enumerate((1, cost.prompt_tokens, cost.completion_tokens, int(cost.error))):
            row[i] += value
        self.dirty.add(day)

    def tokens_since(self, key: str, start: float, now: float | None = None) -> int:
        """`key`'s prompt and completion tokens from `start` (a UTC midnight) on."""
        now = time.time() if now is None else now
        total, day = 0, start
        while day <= now:
            for hour in self._hours(_day(day)).values():
                total += sum(row[1] + row[2] for rows in hour.get(key, {}).values() for row in rows.values())
            day += 86400
        return total

    def flush(self) -> None:
        """Write the days that changed."""
        if self.store is not None:
            for day in sorted(self.dirty):
                self.store.put(self._kv_key(day), json.dumps(self.days[day]).encode())
        self.dirty.clear()


def totals(days: Iterable[tuple[str, Days]], since: float) -> dict[tuple[str, str, str, str], list[int]]:
    """(application, key, model, class) -> [requests, prompt_tokens, completion_tokens, errors] over the
    hours from `since` on, from (application, stored days) pairs."""
    start_hour = datetime.fromtimestamp(since, timezone.utc).strftime("%Y-%m-%d %H")
    out: dict[tuple[str, str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for app, stored in days:
        for day, hours in stored.items():
            for hour, keys in _by_class(hours).items():
                if f"{day} {hour}" < start_hour:
                    continue
                for key, models in keys.items():
                    for model, rows in models.items():
                        for priority, row in rows.items():
                            for i, value in enumerate(row):
                                out[app, key, model, priority][i] += value
    return dict(out)


class GCSStore:
    """Ray's GCS key-value store (raystack's namespace): what the book is written to. Needs ray.init."""

    def get(self, key: str) -> bytes | None:
        from ray.experimental import internal_kv

        return internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)

    def put(self, key: str, value: bytes) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(key, value, overwrite=True, namespace=KV_NAMESPACE)

    def keys(self, prefix: str) -> list[str]:
        from ray.experimental import internal_kv

        return [k.decode() if isinstance(k, bytes) else k
                for k in internal_kv._internal_kv_list(prefix, namespace=KV_NAMESPACE)]


def stored_days(store: Any, since: float, app: str | None = None) -> list[tuple[str, Days]]:
    """(application, that day's hours) for each stored day from `since`'s on, of `app` or every router."""
    first = _day(since)
    out = []
    for kv_key in sorted(store.keys(KV_PREFIX + (f"{app}:" if app else ""))):
        name, _, day = kv_key[len(KV_PREFIX):].rpartition(":")
        if day >= first:
            out.append((name, {day: json.loads(store.get(kv_key) or b"{}")}))
    return out


def since_seconds(text: str) -> float:
    """`30m`, `12h`, `7d` -> seconds; ValueError otherwise."""
    units = {"m": 60, "h": 3600, "d": 86400}
    number, unit = text[:-1], text[-1:]
    if unit not in units or not number.isdigit() or int(number) < 1:
        raise ValueError(f"--since takes a count and a unit (m, h or d), e.g. 1d or 12h, not {text!r}")
    return int(number) * units[unit]


def report(store: Any, since: float, app: str | None = None) -> list[dict[str, Any]]:
    """A row per router application, key name, model and priority class, with its totals from `since` on
    (hourly)."""
    return [{"app": a, "key": k, "model": m, "class": c, **dict(zip(FIELDS, row))}
            for (a, k, m, c), row in sorted(totals(stored_days(store, since, app), since).items())]


def render(rows: list[dict[str, Any]], since_text: str) -> str:
    if not rows:
        return f"No usage recorded in the last {since_text} (usage is counted for routers with api_keys)."
    header = ["APP", "KEY", "MODEL", "CLASS", "REQUESTS", "PROMPT TOKENS", "COMPLETION TOKENS", "ERRORS"]
    lines = [header] + [[r["app"], r["key"], r["model"], r["class"], *(str(r[f]) for f in FIELDS)] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i < 4 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(line, widths))).rstrip() for line in lines)
