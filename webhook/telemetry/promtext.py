"""Read Prometheus' text exposition format (what a sidecar's ``/stats/prometheus`` serves).

Only what ``sidemesh top`` and the tests need: samples with their labels; ``# HELP`` and
``# TYPE`` lines and timestamps are skipped. A line that does not parse raises ValueError
naming it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

__all__ = ["Sample", "parse", "select"]


@dataclass(frozen=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


def parse(text: str) -> Iterator[Sample]:
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            yield _sample(line)
        except (ValueError, IndexError):
            raise ValueError(f"line {number} is not a Prometheus sample: {line[:120]!r}") from None


def select(samples: Iterable[Sample], name: str, **labels: str) -> list[Sample]:
    """The samples called ``name`` whose labels include ``labels``."""
    return [
        s
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def _sample(line: str) -> Sample:
    brace = line.find("{")
    space = line.find(" ")
    if brace == -1 or (space != -1 and space < brace):
        name, _, rest = line.partition(" ")
        return Sample(name, {}, _value(rest))
    name = line[:brace]
    labels, end = _labels(line, brace + 1)
    return Sample(name, labels, _value(line[end:]))


def _labels(line: str, i: int) -> tuple[dict[str, str], int]:
    out: dict[str, str] = {}
    while True:
        while line[i] in " ,":
            i += 1
        if line[i] == "}":
            return out, i + 1
        eq = line.index("=", i)
        key = line[i:eq].strip()
        if line[eq + 1] != '"':
            raise ValueError("label value without quotes")
        i = eq + 2
        value: list[str] = []
        while line[i] != '"':
            if line[i] == "\\":
                i += 1
                value.append({"n": "\n"}.get(line[i], line[i]))
            else:
                value.append(line[i])
            i += 1
        out[key] = "".join(value)
        i += 1


def _value(rest: str) -> float:
    token = rest.split()[0]
    if token in ("+Inf", "Inf"):
        return math.inf
    if token == "-Inf":
        return -math.inf
    return float(token)
