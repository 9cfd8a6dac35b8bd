"""List and watch one kind through the official ``kubernetes`` client, typed at the edge.

The client's generated models are skipped (``_preload_content=False``): objects stay the plain
dicts the API server sent, so fields the models do not know survive, and a list of thousands of
Pods is not turned into thousands of model objects only to be turned back. What this layer
promises instead is small and typed: a :class:`Listing` (items and the list's
resourceVersion, every ``continue`` page followed), and a :class:`WatchStream` of
:class:`WatchEvent`\\ s that another thread can :meth:`~WatchStream.close` at any moment.

Errors are :class:`~webhook.kube.client.KubeAPIError` (status 0: unreachable or the stream broke);
a resourceVersion too old to watch from is :class:`Expired`, whether the server says so with an
HTTP 410 or, as it usually does, with an ``ERROR`` event carrying a 410 ``Status``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, cast

from webhook.kube.client import KubeAPIError

__all__ = [
    "KINDS",
    "Expired",
    "KindSpec",
    "ListWatch",
    "Listing",
    "WatchEvent",
    "WatchStream",
]

EventType = Literal["ADDED", "MODIFIED", "DELETED", "BOOKMARK"]
_EVENT_TYPES = ("ADDED", "MODIFIED", "DELETED", "BOOKMARK")
#: Seconds to connect, and to wait for the list's answer.
CONNECT_TIMEOUT = 5.0
LIST_TIMEOUT = 60.0


class Expired(KubeAPIError):
    """The resourceVersion is older than the API server's history: list again."""

    def __init__(self, message: str) -> None:
        super().__init__(410, message)


@dataclass(frozen=True)
class KindSpec:
    """A watched kind and the client call that lists (and, with ``watch=True``, watches) it
    across all namespaces."""

    kind: str
    api_version: str
    api: str  # the kubernetes.client class, e.g. "CoreV1Api"
    method: str  # e.g. "list_pod_for_all_namespaces"
    resource: str  # for messages and RBAC: "pods", "endpointslices.discovery.k8s.io"
    #: Leading arguments of ``method`` (a custom resource's group, version and plural).
    args: tuple[str, ...] = ()
    #: A kind the cluster may not serve (an optional CRD): a 404 on list means "none yet".
    optional: bool = False


KINDS: tuple[KindSpec, ...] = (
    KindSpec("Namespace", "v1", "CoreV1Api", "list_namespace", "namespaces"),
    KindSpec("Service", "v1", "CoreV1Api", "list_service_for_all_namespaces", "services"),
    KindSpec(
        "EndpointSlice",
        "discovery.k8s.io/v1",
        "DiscoveryV1Api",
        "list_endpoint_slice_for_all_namespaces",
        "endpointslices.discovery.k8s.io",
    ),
    KindSpec("Pod", "v1", "CoreV1Api", "list_pod_for_all_namespaces", "pods"),
    *(
        KindSpec(
            kind,
            f"{group}/{version}",
            "CustomObjectsApi",
            "list_cluster_custom_object",
            f"{plural}.{group}",
            (group, version, plural),
            optional=True,
        )
        for kind, group, version, plural in (
            ("HTTPRoute", "gateway.networking.k8s.io", "v1", "httproutes"),
            ("GRPCRoute", "gateway.networking.k8s.io", "v1", "grpcroutes"),
            ("ReferenceGrant", "gateway.networking.k8s.io", "v1beta1", "referencegrants"),
            ("TrafficPolicy", "sidemesh.io", "v1alpha1", "trafficpolicies"),
            ("AccessPolicy", "sidemesh.io", "v1alpha1", "accesspolicies"),
            ("RateLimitPolicy", "sidemesh.io", "v1alpha1", "ratelimitpolicies"),
        )
    ),
)


@dataclass(frozen=True)
class Listing:
    items: list[dict[str, Any]]
    resource_version: str


@dataclass(frozen=True)
class WatchEvent:
    type: EventType
    object: dict[str, Any]

    @property
    def resource_version(self) -> str:
        return str((self.object.get("metadata") or {}).get("resourceVersion") or "")


class WatchStream:
    """The events of one watch request; iterate it, :meth:`close` it from any thread."""

    def __init__(self, response: Any) -> None:
        self._response = response
        self._closed = threading.Event()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        """End the stream now; a read blocked in another thread returns (urllib3's
        ``shutdown`` unblocks it, which ``close`` alone does not)."""
        self._closed.set()
        # The errors say the connection is already gone (ended, or back in urllib3's pool).
        with contextlib.suppress(ValueError, RuntimeError, OSError):
            self._response.shutdown()
        self._response.release_conn()

    def __enter__(self) -> WatchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[WatchEvent]:
        buffer = b""
        try:
            for chunk in self._response.stream(amt=None, decode_content=True):
                buffer += chunk
                while (end := buffer.find(b"\n")) >= 0:
                    line, buffer = buffer[:end], buffer[end + 1 :]
                    if line.strip():
                        yield _event(line)
        except KubeAPIError:
            raise
        except Exception as exc:
            if self.closed:  # closed from another thread: whatever the read raised, we're done
                return
            if not (isinstance(exc, OSError) or type(exc).__module__.startswith("urllib3")):
                raise
            raise KubeAPIError(0, f"watch stream broke: {type(exc).__name__}: {exc}") from None
        if buffer.strip() and not self.closed:
            raise KubeAPIError(0, "watch stream ended in the middle of an event")


def _event(line: bytes) -> WatchEvent:
    try:
        raw = json.loads(line)
        type_, obj = raw["type"], raw["object"]
    except (ValueError, KeyError, TypeError):
        raise KubeAPIError(0, f"not a watch event: {line[:200]!r}") from None
    if type_ == "ERROR":
        code = int(obj.get("code") or 0) if isinstance(obj, dict) else 0
        message = str(obj.get("message") or obj) if isinstance(obj, dict) else str(obj)
        if code == 410:
            raise Expired(message)
        raise KubeAPIError(code, f"watch error: {message}")
    if type_ not in _EVENT_TYPES or not isinstance(obj, dict):
        raise KubeAPIError(0, f"not a watch event: {line[:200]!r}")
    return WatchEvent(cast(EventType, type_), obj)


class ListWatch:
    """List and watch calls for :data:`KINDS` on one ``kubernetes.client.ApiClient``."""

    def __init__(self, api_client: Any) -> None:
        self._api_client = api_client

    def _method(self, spec: KindSpec) -> Callable[..., Any]:
        from kubernetes import client

        method = getattr(getattr(client, spec.api)(self._api_client), spec.method)
        return cast(Callable[..., Any], functools.partial(method, *spec.args))

    def list(self, spec: KindSpec, *, page_size: int = 500) -> Listing:
        """Every object of ``spec``, following ``continue`` tokens; all pages come from one
        snapshot, whose resourceVersion the listing carries."""
        items: list[dict[str, Any]] = []
        token = ""
        while True:
            kwargs: dict[str, Any] = {"limit": page_size}
            if token:
                kwargs["_continue"] = token
            page = json.loads(_call(self._method(spec), LIST_TIMEOUT, **kwargs).data)
            items.extend(page.get("items") or [])
            meta = page.get("metadata") or {}
            token = meta.get("continue") or ""
            if not token:
                return Listing(items, str(meta.get("resourceVersion") or ""))

    def watch(self, spec: KindSpec, resource_version: str, timeout_seconds: int) -> WatchStream:
        """A watch from ``resource_version``, with bookmarks; the server ends it cleanly
        after ``timeout_seconds``, and a silent connection is given up a little later."""
        response = _call(
            self._method(spec),
            timeout_seconds + 30.0,
            watch=True,
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout_seconds,
        )
        return WatchStream(response)


def _call(fn: Callable[..., Any], read_timeout: float, **kwargs: Any) -> Any:
    from kubernetes.client.exceptions import ApiException

    try:
        return fn(
            _preload_content=False, _request_timeout=(CONNECT_TIMEOUT, read_timeout), **kwargs
        )
    except ApiException as exc:
        message = _status_message(exc)
        if exc.status == 410:
            raise Expired(message) from None
        raise KubeAPIError(exc.status or 0, message) from None
    except Exception as exc:
        if isinstance(exc, OSError) or type(exc).__module__.startswith("urllib3"):
            raise KubeAPIError(0, f"cannot reach the API server: {exc}") from None
        raise


def _status_message(exc: Any) -> str:
    try:
        body = json.loads(exc.body)
        return f"{exc.status} {body.get('reason', '')}: {body.get('message', '')}"
    except (TypeError, ValueError, AttributeError):
        return f"{exc.status} {exc.reason}"
