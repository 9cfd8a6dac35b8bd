"""One connected sidecar as the push engine sees it, and what one push of one type sends it.

:class:`ProxyConn` is one ADS stream: per type what was sent and ACKed
(:class:`~webhook.discovery.tables.TypeState`), the names of the shared resources in the
proxy's scope, its own resources and what it learned on demand. :func:`type_delta` is the
delta protocol's decision for one type: which names to look at, then which of them to (re)send
and which to remove. The engine (:mod:`webhook.discovery.core`) sends what it decides.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from webhook.discovery.compiler import LISTENER
from webhook.discovery.resources import Encoded
from webhook.discovery.tables import ResourceTable, TypeState

__all__ = ["Desired", "ProxyConn", "type_delta"]


@dataclass
class ProxyConn:
    """One connected sidecar (one ADS stream)."""

    conn_id: int
    spiffe_id: str
    namespace: str
    pod_name: str
    peer: str
    node_id: str
    connected_at: float
    #: Serialised DeltaDiscoveryResponses (None ends the stream).
    queue: asyncio.Queue[bytes | None]
    types: dict[str, TypeState] = field(default_factory=dict)
    scope: frozenset[str] = frozenset()
    local: dict[str, dict[str, Encoded]] = field(default_factory=dict)
    learned: set[tuple[str, str]] = field(default_factory=set)
    #: On-demand cluster name (``learn|ip:port``) → the Service cluster it stands for.
    ondemand: dict[str, str] = field(default_factory=dict)
    nonce: int = 0

    def state(self, type_url: str) -> TypeState:
        return self.types.setdefault(type_url, TypeState())


class Desired(Mapping[str, Encoded]):
    """A proxy's desired resources of one type: its own, then the shared ones in its scope."""

    def __init__(
        self, local: Mapping[str, Encoded], shared: Mapping[str, Encoded], scope: frozenset[str]
    ) -> None:
        self._local, self._shared, self._scope = local, shared, scope

    def __getitem__(self, name: str) -> Encoded:
        if name in self._local:
            return self._local[name]
        if name in self._scope:
            return self._shared[name]
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        yield from self._local
        yield from (n for n in self._scope if n in self._shared)

    def __len__(self) -> int:
        return len(self._local) + len(self._scope)


def type_delta(
    conn: ProxyConn,
    ts: TypeState,
    type_url: str,
    table: ResourceTable | None,
    scope_delta: frozenset[str],
    extra: Iterable[str] | None,
    *,
    full: bool,
    local_changed: bool = True,
) -> tuple[dict[str, Encoded], list[str]]:
    """What to (re)send ``conn`` of ``type_url`` and what to remove. The names looked at: the
    change of its scope, its own resources (unless they cannot have changed), ``extra`` (names
    it just asked for), everything on a first request (``full``), and the shared ``table``'s
    changes since the stream last caught up (which moves the stream's mark to now)."""
    local = conn.local.get(type_url, {})
    desired = Desired(local, table.items if table else {}, conn.scope)
    names: set[str] = set(scope_delta)
    if local_changed:
        names.update(local)
    if extra is not None:
        names.update(extra)
    if full:
        names.update(desired)
        names.update(ts.sent)
    if table is not None:
        names.update(table.changed_since(ts.seq))
        ts.seq = table.seq
    updates, removed = ts.diff(desired, names)
    if type_url == LISTENER:
        removed += [n for n in ts.sent if n not in local and n not in removed]
    return updates, removed
