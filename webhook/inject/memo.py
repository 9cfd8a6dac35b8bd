"""The injection core's only state: results of pure functions, remembered per argument object.

Some of what an injection builds depends only on the mesh config and the pod's overrides: the
overrides of a pod without sidemesh annotations, the init container's flags, the proxy's
arguments. Working them out for every pod costs a noticeable share of an injection (figures in
docs/benchmarks.md), and hashing a ``MeshConfig`` walks every field, which costs more than the
lookup saves. So the functions below are wrapped with :func:`per_object` or :func:`per_pair`,
which remember their results by the *identity* of the arguments. This is the one place that
does so; no other pure module keeps state (``tests/test_layering.py`` checks it).

Why this is safe:

* the wrapped functions are pure and their results immutable (str, int, tuples, frozen
  dataclasses), so a remembered result is exactly what a new call would return, and sharing it
  between pods shares nothing that can be changed;
* an entry keeps its argument objects alive and a hit is checked with ``is``, so an ``id()``
  reused by a new object after the old one died can never match;
* each table is bounded: when full it starts over. One config serves many pods; an annotated
  pod brings a new ``Overrides``, which simply misses and is computed as without a memo.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["entries", "per_object", "per_pair"]

_A = TypeVar("_A")
_B = TypeVar("_B")
_R = TypeVar("_R")

#: Every table, so that :func:`entries` can show the bound holds.
_TABLES: list[dict[Any, Any]] = []


def entries() -> int:
    """How many results are remembered, over all tables."""
    return sum(len(table) for table in _TABLES)


def per_object(*, bound: int) -> Callable[[Callable[[_A], _R]], Callable[[_A], _R]]:
    """Remember ``fn(a)`` by the identity of ``a``; at most ``bound`` entries."""

    def wrap(fn: Callable[[_A], _R]) -> Callable[[_A], _R]:
        table: dict[int, tuple[_A, _R]] = {}
        _TABLES.append(table)

        @functools.wraps(fn)
        def call(a: _A) -> _R:
            hit = table.get(id(a))
            if hit is not None and hit[0] is a:
                return hit[1]
            result = fn(a)
            if len(table) >= bound:
                table.clear()
            table[id(a)] = (a, result)
            return result

        return call

    return wrap


def per_pair(*, bound: int) -> Callable[[Callable[[_A, _B], _R]], Callable[[_A, _B], _R]]:
    """Remember ``fn(a, b)`` by the identities of ``a`` and ``b``; at most ``bound`` entries."""

    def wrap(fn: Callable[[_A, _B], _R]) -> Callable[[_A, _B], _R]:
        table: dict[tuple[int, int], tuple[_A, _B, _R]] = {}
        _TABLES.append(table)

        @functools.wraps(fn)
        def call(a: _A, b: _B) -> _R:
            hit = table.get((id(a), id(b)))
            if hit is not None and hit[0] is a and hit[1] is b:
                return hit[2]
            result = fn(a, b)
            if len(table) >= bound:
                table.clear()
            table[id(a), id(b)] = (a, b, result)
            return result

        return call

    return wrap
