"""Fixed-window counting, the arithmetic of the rate-limit service. Pure.

A descriptor such as ``(policy=shop/orders, caller=spiffe://…/sa/web)`` names one budget (its
size comes from the policy, :mod:`webhook.ratelimit.table`). Its counter for the current
window lives under ``sidemesh:rl:<hash of domain + entries>:<window number>`` and expires
shortly after the window ends, so Redis never keeps more than two windows of each budget.
Every replica of the service computes the same key for the same budget and window: the count
is shared.

Fixed windows are what real deployments of Envoy's rate-limit service use: one INCRBY per
descriptor and request, no per-request state besides the counter. The price is the window
edge: up to twice the limit can pass in a short span around it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

__all__ = ["Budget", "budget_of", "counter_key"]

UNIT_SECONDS: Final = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


@dataclass(frozen=True)
class Budget:
    key: str
    limit: int
    unit: str
    #: Seconds until the window ends (the counter's key changes then).
    reset_in: float
    #: How long Redis keeps the counter.
    ttl: int
    policy: str


def counter_key(domain: str, entries: Sequence[tuple[str, str]], window: int) -> str:
    digest = hashlib.blake2b(digest_size=12)
    for part in (domain, *(f"{k}={v}" for k, v in entries)):
        digest.update(part.encode())
        digest.update(b"\0")
    return f"sidemesh:rl:{digest.hexdigest()}:{window}"


def budget_of(
    domain: str,
    entries: Sequence[tuple[str, str]],
    limit: int,
    unit: str,
    now: float,
    policy: str = "",
) -> Budget:
    """The budget of ``limit`` per ``unit`` that the descriptor ``entries`` name, at ``now``."""
    seconds = UNIT_SECONDS[unit]
    window = int(now // seconds)
    reset_in = (window + 1) * seconds - now
    return Budget(counter_key(domain, entries, window), limit, unit, reset_in, seconds + 5, policy)
