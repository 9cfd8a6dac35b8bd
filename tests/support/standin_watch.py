"""List and watch for the kube-apiserver stand-in: Namespaces, Services, Pods, EndpointSlices.

What the real API server does, and so this does:

* every write bumps one cluster-wide ``resourceVersion`` (a decimal string, like etcd's
  revision); objects carry the one of their last write, a list carries the current one;
* ``?watch=1&resourceVersion=N`` streams, as JSON lines over a chunked response, every change
  after N (``ADDED``/``MODIFIED``/``DELETED``, the object as it is after the change; for a
  delete, as it was, with the delete's resourceVersion); without a resourceVersion it first
  sends the current objects as synthetic ``ADDED`` events;
* ``allowWatchBookmarks=true`` lets the server send ``BOOKMARK`` events: an object of the kind
  with only ``metadata.resourceVersion``, telling the client it may resume from there;
* history is finite: after :meth:`ObjectLog.compact` a watch from an older version gets a 200
  whose only event is ``ERROR`` with a ``Status`` of code 410 (reason ``Expired``), and the
  client must list again;
* ``timeoutSeconds`` ends a watch cleanly after that long; ``limit``/``continue`` page a list
  (every page at the resourceVersion of the first).

Tests drive it with :meth:`ObjectLog.add` / :meth:`modify` / :meth:`delete` /
:meth:`bookmark` / :meth:`compact`, and cut every open watch with :meth:`drop_watches` (the
connection just ends, as when a load balancer or the API server restarts).
"""

from __future__ import annotations

import base64
import bisect
import builtins
import copy
import functools
import itertools
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["RESOURCES", "Gone", "ObjectLog", "Resource", "match_list_path", "match_status_path"]


@dataclass(frozen=True)
class Resource:
    kind: str
    api_version: str
    plural: str
    namespaced: bool

    def prefix(self) -> str:
        return "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"


RESOURCES = {
    r.plural: r
    for r in (
        Resource("Namespace", "v1", "namespaces", False),
        Resource("Service", "v1", "services", True),
        Resource("Pod", "v1", "pods", True),
        Resource("EndpointSlice", "discovery.k8s.io/v1", "endpointslices", True),
        Resource("HTTPRoute", "gateway.networking.k8s.io/v1", "httproutes", True),
        Resource("GRPCRoute", "gateway.networking.k8s.io/v1", "grpcroutes", True),
        Resource("TrafficPolicy", "sidemesh.io/v1alpha1", "trafficpolicies", True),
        Resource("ReferenceGrant", "gateway.networking.k8s.io/v1beta1", "referencegrants", True),
        Resource("AccessPolicy", "sidemesh.io/v1alpha1", "accesspolicies", True),
        Resource("RateLimitPolicy", "sidemesh.io/v1alpha1", "ratelimitpolicies", True),
    )
}
_BY_KIND = {r.kind: r for r in RESOURCES.values()}
_LIST_PATH = re.compile(
    r"^/(?:api/v1|apis/discovery\.k8s\.io/v1|apis/gateway\.networking\.k8s\.io/v1(?:beta1)?"
    r"|apis/sidemesh\.io/v1alpha1)(?:/namespaces/([^/]+))?/([a-z]+)$"
)


def match_list_path(path: str) -> tuple[Resource, str | None] | None:
    """The resource and namespace (``None`` = all) of a list/watch path, else ``None``."""
    m = _LIST_PATH.match(path)
    if m is None or m.group(2) not in RESOURCES:
        return None
    res = RESOURCES[m.group(2)]
    if not path.startswith(res.prefix() + "/") or (m.group(1) and not res.namespaced):
        return None
    return res, m.group(1)


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: maps merge, null deletes, anything else (lists too) replaces."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out


_STATUS_PATH = re.compile(
    r"^/apis/(gateway\.networking\.k8s\.io/v1|sidemesh\.io/v1alpha1)/namespaces/([^/]+)/"
    r"([a-z]+)/([^/]+)/status$"
)


def match_status_path(path: str) -> tuple[Resource, str, str] | None:
    """The resource, namespace and name of a custom object's status subresource path."""
    m = _STATUS_PATH.match(path)
    if m is None or m.group(3) not in RESOURCES or RESOURCES[m.group(3)].api_version != m.group(1):
        return None
    return RESOURCES[m.group(3)], m.group(2), m.group(4)


class Gone(Exception):
    """The requested resourceVersion is older than the history kept (HTTP 410)."""


@dataclass(frozen=True)
class _Event:
    rv: int
    type: str
    kind: str
    obj: dict[str, Any]


class ObjectLog:
    """The stand-in's objects of the watchable kinds and their history. Thread-safe."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._rv = 1
        self._objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._history: list[_Event] = []
        self._snapshots: dict[int, tuple[int, list[dict[str, Any]]]] = {}  # paged lists
        self._snapshot_ids = itertools.count(1)
        self._oldest = 1  # a watch from a version below this is Gone
        self._generation = 0  # bumped by drop_watches(): open watches end
        self._bookmarks = 0  # bumped by bookmark(): open watches send one
        self._raw: list[bytes] = []
        self.closing = False
        self.open_watches = 0

    # --- what tests do --------------------------------------------------------------------

    def add(self, obj: dict[str, Any]) -> dict[str, Any]:
        return self._write("ADDED", obj)

    def modify(self, obj: dict[str, Any]) -> dict[str, Any]:
        return self._write("MODIFIED", obj)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        with self._cond:
            old = self._objects.pop((kind, namespace, name))
            self._rv += 1
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(self._rv)
            self._history.append(_Event(self._rv, "DELETED", kind, gone))
            self._cond.notify_all()

    def patch_status(self, kind: str, namespace: str, name: str, patch: Any) -> dict[str, Any]:
        """A JSON merge patch of the object's ``status`` (the status subresource): a new
        resourceVersion and a MODIFIED event, as the API server does. KeyError: no object."""
        with self._cond:
            current = copy.deepcopy(self._objects[(kind, namespace, name)])
        status = patch.get("status") if isinstance(patch, dict) else None
        current["status"] = _merge_patch(current.get("status") or {}, status or {})
        return self._write("MODIFIED", current)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self._cond:
            obj = self._objects.get((kind, namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def send_raw(self, line: bytes) -> None:
        """The next open watch sends ``line`` as is (a broken proxy, a bad object)."""
        with self._cond:
            self._raw.append(line)
            self._cond.notify_all()

    def bookmark(self) -> None:
        """Every open watch that allowed bookmarks sends one at the current version."""
        with self._cond:
            self._bookmarks += 1
            self._cond.notify_all()

    def compact(self) -> None:
        """Forget the history: a watch from any version before now gets 410 Gone."""
        with self._cond:
            self._history.clear()
            self._snapshots.clear()
            self._oldest = self._rv

    def drop_watches(self) -> None:
        """End every open watch connection abruptly (no final chunk)."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closing = True
            self._cond.notify_all()

    @property
    def resource_version(self) -> str:
        with self._cond:
            return str(self._rv)

    def _write(self, type_: str, obj: dict[str, Any]) -> dict[str, Any]:
        kind = obj["kind"]
        meta = obj["metadata"]
        key = (kind, meta.get("namespace", "") if _BY_KIND[kind].namespaced else "", meta["name"])
        with self._cond:
            if (type_ == "ADDED") == (key in self._objects):
                raise ValueError(
                    f"{type_} of {key}: it {'exists' if type_ == 'ADDED' else 'is absent'}"
                )
            self._rv += 1
            stored = copy.deepcopy(obj)
            stored["apiVersion"] = _BY_KIND[kind].api_version
            stored["metadata"]["resourceVersion"] = str(self._rv)
            stored["metadata"].setdefault("uid", f"uid-{kind}-{key[1]}-{key[2]}".lower())
            self._objects[key] = stored
            self._history.append(_Event(self._rv, type_, kind, stored))
            self._cond.notify_all()
            return copy.deepcopy(stored)

    # --- what the API server answers --------------------------------------------------------

    def list(
        self, res: Resource, namespace: str | None, limit: int = 0, cont: str = ""
    ) -> dict[str, Any]:
        """A ``<Kind>List``; ``limit``/``continue`` page it like the real server, every page
        from the snapshot the first one was cut from (gone after :meth:`compact`)."""
        with self._cond:
            if cont:
                snap, start = (int(x) for x in base64.b64decode(cont).decode().split(":"))
                if snap not in self._snapshots:
                    raise Gone("The provided continue parameter is too old")
                rv, items = self._snapshots[snap]
            else:
                rv, start, items = self._rv, 0, self._current(res, namespace)
            end = len(items) if limit <= 0 else start + limit
            meta: dict[str, Any] = {"resourceVersion": str(rv)}
            if end < len(items):
                if not cont:
                    snap = next(self._snapshot_ids)
                    self._snapshots[snap] = (rv, items)
                meta["continue"] = base64.b64encode(f"{snap}:{end}".encode()).decode()
                meta["remainingItemCount"] = len(items) - end
        page = [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")} for o in items]
        return {
            "kind": f"{res.kind}List",
            "apiVersion": res.api_version,
            "metadata": meta,
            "items": page[start:end],
        }

    def _current(self, res: Resource, namespace: str | None) -> builtins.list[dict[str, Any]]:
        return [
            copy.deepcopy(o)
            for k, o in sorted(self._objects.items())
            if k[0] == res.kind and (namespace is None or k[1] == namespace)
        ]

    def _woken(self, generation: int, seen_bookmarks: int, since: int, deadline: float) -> bool:
        """Whether a waiting watch has something to do (called with the condition held)."""
        return (
            self.closing
            or self._generation != generation
            or self._bookmarks != seen_bookmarks
            or self._rv > since
            or bool(self._raw)
            or time.monotonic() >= deadline
        )

    def watch(
        self,
        res: Resource,
        namespace: str | None,
        query: dict[str, str],
        send: Callable[[bytes], None],
    ) -> bool:
        """Stream events to ``send`` until the watch ends; False when it was dropped."""
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 1800)
        with self._cond:
            generation, seen_bookmarks = self._generation, self._bookmarks
            self.open_watches += 1
            self._cond.notify_all()
            raw = query.get("resourceVersion", "")
            if raw in ("", "0"):
                since = self._rv
                initial = [{"type": "ADDED", "object": o} for o in self._current(res, namespace)]
            else:
                since = int(raw)
                initial = []
                if since < self._oldest:
                    initial = [{"type": "ERROR", "object": _expired(since, self._oldest)}]
        try:
            for ev in initial:
                send(encode_line(_with_kind(ev, res)))
            if initial and initial[0]["type"] == "ERROR":
                return True  # the real server ends the watch after the 410
            while True:
                with self._cond:
                    self._cond.wait_for(
                        functools.partial(self._woken, generation, seen_bookmarks, since, deadline),
                        timeout=max(0.0, deadline - time.monotonic()),
                    )
                    if self.closing or self._generation != generation:
                        return False
                    if time.monotonic() >= deadline:
                        return True
                    start = bisect.bisect_right(self._history, since, key=lambda e: e.rv)
                    events = [e for e in self._history[start:] if e.kind == res.kind]
                    events = [e for e in events if _in_namespace(e, namespace)]
                    since = self._rv
                    mark = bookmarks and self._bookmarks != seen_bookmarks
                    seen_bookmarks = self._bookmarks
                    lines, self._raw = self._raw, []
                for line in lines:
                    send(line)
                for e in events:
                    send(encode_line({"type": e.type, "object": copy.deepcopy(e.obj)}))
                if mark:
                    event = {"type": "BOOKMARK", "object": _bookmark(since)}
                    send(encode_line(_with_kind(event, res)))
        finally:
            with self._cond:
                self.open_watches -= 1
                self._cond.notify_all()

    def wait_for_watches(self, count: int, timeout: float = 10.0) -> bool:
        """Wait until ``count`` watches are open (a test's sync point, not a timing assert)."""
        with self._cond:
            return self._cond.wait_for(lambda: self.open_watches >= count, timeout=timeout)


def _in_namespace(ev: _Event, namespace: str | None) -> bool:
    return namespace is None or ev.obj["metadata"].get("namespace") == namespace


def _with_kind(event: dict[str, Any], res: Resource) -> dict[str, Any]:
    obj = event["object"]
    if obj.get("kind") != "Status":
        obj = {"kind": res.kind, "apiVersion": res.api_version, **obj}
    return {"type": event["type"], "object": obj}


def _bookmark(rv: int) -> dict[str, Any]:
    return {"metadata": {"resourceVersion": str(rv)}}


def _expired(asked: int, oldest: int) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f"too old resource version: {asked} ({oldest})",
        "reason": "Expired",
        "code": 410,
    }


def parse_query(path: str) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(urlsplit(path).query).items()}


def encode_line(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode() + b"\n"
