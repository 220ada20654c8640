"""Reading a Prometheus text exposition in tests: samples as (name, labels, value), and sums over them."""

from __future__ import annotations

import re

LINE = re.compile(r'^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    samples = []
    for line in text.splitlines():
        match = LINE.match(line)
        if match and not line.startswith("#"):
            samples.append((match["name"], dict(LABEL.findall(match["labels"] or "")), float(match["value"])))
    return samples


def total(samples, name: str, **labels: str) -> float:
    """The sum of `name` over every series whose labels include `labels` (Ray adds its own, e.g. WorkerId)."""
    return sum(v for n, l, v in samples if n == name and all(l.get(k) == want for k, want in labels.items()))
