"""The control plane's memory of what it serves: shared resources with a per-type change log,
and per-proxy delta-xDS bookkeeping (what was sent, ACKed, NACKed). Pure: no I/O, no clock.

A Service's cluster and endpoints are the same bytes for every proxy that sees it, so they are
encoded once into a :class:`ResourceTable`. Each change appends ``(seq, name)`` to the table's
log; a stream remembers the last ``seq`` it caught up with and asks "what changed since" —
O(changes), not O(watched names) per stream per push.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from webhook.discovery.resources import Encoded

__all__ = ["WILDCARD", "NackRecord", "ResourceTable", "TypeState"]

WILDCARD = "*"


class ResourceTable:
    """Resources of one type by name, plus the log of names changed (set or removed)."""

    def __init__(self, type_url: str) -> None:
        self.type_url = type_url
        self.items: dict[str, Encoded] = {}
        self.seq = 0
        self._log_seq: list[int] = []
        self._log_name: list[str] = []

    def put(self, name: str, value: Encoded) -> bool:
        if self.items.get(name) == value:
            return False
        self.items[name] = value
        self._append(name)
        return True

    def remove(self, name: str) -> bool:
        if self.items.pop(name, None) is None:
            return False
        self._append(name)
        return True

    def changed_since(self, seq: int) -> set[str]:
        """Names set or removed after ``seq`` (``seq`` below the kept log: everything)."""
        if seq >= self.seq:
            return set()
        if self._log_seq and seq < self._log_seq[0] - 1:
            return set(self.items) | set(self._log_name)
        start = bisect.bisect_right(self._log_seq, seq)
        return set(self._log_name[start:])

    def compact(self, keep_after: int) -> None:
        """Forget log entries no stream still needs (all streams are past ``keep_after``)."""
        cut = bisect.bisect_right(self._log_seq, keep_after)
        if cut:
            del self._log_seq[:cut]
            del self._log_name[:cut]

    def _append(self, name: str) -> None:
        self.seq += 1
        self._log_seq.append(self.seq)
        self._log_name.append(name)


@dataclass
class NackRecord:
    type_url: str
    nonce: str
    message: str
    names: tuple[str, ...]


@dataclass
class TypeState:
    """One proxy's view of one resource type over delta xDS."""

    subscribed: set[str] = field(default_factory=set)
    requested: bool = False
    #: name → version last sent (what the proxy has or is about to have).
    sent: dict[str, str] = field(default_factory=dict)
    #: The last table ``seq`` this proxy has caught up with (shared types only).
    seq: int = 0
    #: nonce → (names sent, when) awaiting ACK/NACK.
    pending: dict[str, tuple[tuple[str, ...], float]] = field(default_factory=dict)
    last_acked_nonce: str = ""
    nacks: int = 0
    last_nack: NackRecord | None = None

    @property
    def wildcard(self) -> bool:
        return WILDCARD in self.subscribed

    def wants(self, name: str) -> bool:
        return self.wildcard or name in self.subscribed

    def subscribe(self, names: Iterable[str], initial: Mapping[str, str]) -> None:
        names = list(names)
        if not self.requested and not names:
            names = [WILDCARD]  # the first request without names is a wildcard subscription
        self.requested = True
        self.subscribed.update(names)
        # What the proxy already has (a reconnect): resend only what differs.
        for name, version in initial.items():
            self.sent.setdefault(name, version)

    def unsubscribe(self, names: Iterable[str]) -> None:
        for name in names:
            self.subscribed.discard(name)
            self.sent.pop(name, None)

    def diff(
        self, desired: Mapping[str, Encoded], candidates: Iterable[str]
    ) -> tuple[dict[str, Encoded], list[str]]:
        """Among ``candidates``: what to (re)send and what to remove, given ``desired``."""
        updates: dict[str, Encoded] = {}
        removed: list[str] = []
        for name in candidates:
            want = desired.get(name)
            if want is not None and self.wants(name):
                if self.sent.get(name) != want.version:
                    updates[name] = want
            elif name in self.sent:
                removed.append(name)
        return updates, removed

    def record_sent(
        self, nonce: str, updates: Mapping[str, Encoded], removed: Iterable[str], now: float
    ) -> None:
        for name, enc in updates.items():
            self.sent[name] = enc.version
        for name in removed:
            self.sent.pop(name, None)
        self.pending[nonce] = (tuple(updates), now)
