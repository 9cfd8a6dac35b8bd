"""Token buckets per key: how the CA bounds requests per identity and, for callers without a
valid token, per source address."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["RateLimiter"]


class RateLimiter:
    """A token bucket per key: ``per_minute`` requests, refilled continuously, burst the same."""

    def __init__(
        self,
        per_minute: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 50_000,
    ) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    def wait(self, key: str) -> float:
        """Seconds until ``key`` may make a request (0 now), without spending anything."""
        tokens, last = self._buckets.get(key, (self.capacity, 0.0))
        tokens = min(self.capacity, tokens + (self._clock() - last) * self.rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def allow(self, key: str) -> float:
        """0 when allowed (and counted), else the seconds until one request is allowed."""
        now = self._clock()
        tokens, last = self._buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
        if len(self._buckets) >= self._max_keys and key not in self._buckets:
            self._prune(now)
        self._buckets[key] = (tokens - 1.0, now)
        return 0.0

    def _prune(self, now: float) -> None:
        full = self.capacity / self.rate  # a bucket idle this long is full again: forget it
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full}
