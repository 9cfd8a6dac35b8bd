"""The objects the control plane knows, by kind, namespace and name — fed by the sources.

A source (the Kubernetes API, a directory of manifests) only ever calls :meth:`upsert`,
:meth:`delete` and :meth:`replace`; readers call :meth:`get` and :meth:`list` and subscribe
to changes. A subscriber is told *which* keys changed, never handed the objects: it reads
what it needs, so a burst of changes to one object costs it one read.

Objects are plain dicts as the API server sends them (``kind``, ``metadata`` …); the store
keeps them as given and never mutates them, so readers must not either.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["KINDS", "Key", "ObjectStore", "key_of"]

#: The kinds the control plane watches: the mesh, then its traffic rules and access policies.
KINDS = (
    "Namespace",
    "Service",
    "EndpointSlice",
    "Pod",
    "HTTPRoute",
    "GRPCRoute",
    "TrafficPolicy",
    "ReferenceGrant",
    "AccessPolicy",
    "RateLimitPolicy",
)

Obj = Mapping[str, Any]


@dataclass(frozen=True, order=True)
class Key:
    """Where an object lives; ``namespace`` is ``""`` for cluster-scoped kinds."""

    kind: str
    namespace: str
    name: str


def key_of(obj: Obj, kind: str | None = None) -> Key:
    meta = obj.get("metadata") or {}
    namespace = str(meta.get("namespace") or "")
    return Key(kind or str(obj.get("kind", "")), namespace, str(meta["name"]))


Listener = Callable[[frozenset[Key]], None]


class ObjectStore:
    """Thread-safe: sources may run in threads (the ``kubernetes`` client is blocking)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[str, dict[Key, Obj]] = {}
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(changed_keys)`` after every change (outside the store's lock)."""
        self._listeners.append(listener)

    def upsert(self, obj: Obj, kind: str | None = None) -> None:
        key = key_of(obj, kind)
        with self._lock:
            bucket = self._objects.setdefault(key.kind, {})
            if bucket.get(key) == obj:
                return
            bucket[key] = obj
        self._notify(frozenset({key}))

    def delete(self, kind: str, namespace: str, name: str) -> None:
        key = Key(kind, namespace, name)
        with self._lock:
            if self._objects.get(kind, {}).pop(key, None) is None:
                return
        self._notify(frozenset({key}))

    def replace(self, kind: str, objs: Iterable[Obj]) -> None:
        """Make ``kind`` exactly ``objs`` (after a list or relist): what vanished is deleted."""
        fresh = {key_of(o, kind): o for o in objs}
        with self._lock:
            old = self._objects.get(kind, {})
            changed = {k for k in old.keys() | fresh.keys() if old.get(k) != fresh.get(k)}
            self._objects[kind] = fresh
        if changed:
            self._notify(frozenset(changed))

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        with self._lock:
            return self._objects.get(kind, {}).get(Key(kind, namespace, name))

    def list(self, kind: str, namespace: str | None = None) -> list[Obj]:
        with self._lock:
            items = list(self._objects.get(kind, {}).items())
        items.sort(key=lambda kv: kv[0])
        return [o for k, o in items if namespace in (None, k.namespace)]

    def _notify(self, keys: frozenset[Key]) -> None:
        for listener in list(self._listeners):
            listener(keys)
