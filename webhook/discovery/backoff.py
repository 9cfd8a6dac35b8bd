"""Capped exponential backoff with jitter (pure: the caller brings the random number).

After the n-th failure in a row a watcher waits ``d/2 + u·d/2`` with ``d = min(cap, base·2ⁿ⁻¹)``
and ``u`` uniform in [0, 1): the wait doubles per failure up to the cap, never drops below half
of it (so a flapping API server is not hammered), and is spread over the other half so that
every replica's watchers, cut off by the same API-server restart, do not come back in step.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass(frozen=True)
class Backoff:
    base: float = 0.5
    """Seconds around which the first retry waits."""
    cap: float = 30.0
    """The longest wait, however many failures came before."""

    def __post_init__(self) -> None:
        if not 0 < self.base <= self.cap:
            raise ValueError(f"backoff needs 0 < base <= cap, got {self.base}, {self.cap}")

    def delay(self, failures: int, u: float) -> float:
        """The wait after ``failures`` (≥ 1) failures in a row, for ``u`` in [0, 1)."""
        ceiling = min(self.cap, self.base * 2.0 ** min(max(failures, 1) - 1, 62))
        return ceiling / 2 + u * ceiling / 2
