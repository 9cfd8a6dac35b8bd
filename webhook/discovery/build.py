"""Building the mesh model from the objects the store holds: which pod is behind each
endpoint of each Service port, and which endpoints get mTLS.

Pure: :func:`build_model` turns plain Kubernetes objects into frozen values
(:mod:`webhook.discovery.model`), read by :mod:`webhook.discovery.objects`;
:func:`update_endpoints` is the fast path of one Service's endpoint change.

Auto-mTLS. An endpoint gets mTLS when its pod carries the ``sidemesh.io/status`` annotation
(the injector's record) and the port is captured on its side: not excluded from inbound
capture, and not a declared-TCP port of a PERMISSIVE pod. The latter is plaintext because a
PERMISSIVE proxy would have to wait for the client's first bytes to tell TLS from plaintext,
and a server-first client never sends any (see the discovery docs).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Literal

from webhook.config import DEFAULTS
from webhook.discovery.model import Endpoint, MeshModel, PodInfo, Service
from webhook.discovery.objects import read_pod, read_service, slice_entries
from webhook.telemetry.settings import namespace_settings
from webhook.telemetry.workload import workload_name

__all__ = [
    "Memo",
    "build_model",
    "spiffe_id",
    "update_endpoints",
]


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


class Memo(typing.Protocol):
    """What :func:`build_model` may reuse between builds (the push engine keeps one)."""

    def get(self, obj: Any, parse: Callable[[Any], Any]) -> Any: ...

    def endpoint(
        self,
        ip: str,
        port: int,
        identity: str | None,
        pod: str | None,
        workload: tuple[str, str] | None = None,
    ) -> Endpoint: ...

    def sweep(self) -> None: ...


class _NoMemo:
    def get(self, obj: Any, parse: Callable[[Any], Any]) -> Any:
        return parse(obj)

    def endpoint(
        self,
        ip: str,
        port: int,
        identity: str | None,
        pod: str | None,
        workload: tuple[str, str] | None = None,
    ) -> Endpoint:
        return Endpoint(ip, port, identity, pod, workload)

    def sweep(self) -> None:
        return


def build_model(
    objects: Mapping[str, Iterable[Mapping[str, Any]]],
    *,
    trust_domain: str = DEFAULTS.trust_domain,
    default_inbound_mtls: Literal["PERMISSIVE", "STRICT"] = DEFAULTS.inbound_mtls,
    cache: Memo | None = None,
) -> MeshModel:
    """The model of ``objects`` (by kind, as :meth:`ObjectStore.list` returns them)."""
    memo: Memo = cache or _NoMemo()
    pods: dict[tuple[str, str], PodInfo] = {}
    for obj in objects.get("Pod", ()):
        pod = memo.get(obj, lambda o: read_pod(o, default_inbound_mtls))
        if pod is not None:
            pods[(pod.namespace, pod.name)] = pod
    by_ip = {ip: pod for pod in pods.values() for ip in pod.ips}
    services: dict[tuple[str, str], Service] = {}
    for obj in objects.get("Service", ()):
        svc = memo.get(obj, read_service)
        if svc is not None:
            services[(svc.namespace, svc.name)] = svc
    raw_eps: dict[tuple[str, str, str], list[tuple[str, int, PodInfo | None]]] = {}
    server_first: dict[tuple[str, str], set[int]] = {}
    for obj in objects.get("EndpointSlice", ()):
        namespace, entries = memo.get(obj, slice_entries)
        for key, ip, port, ref in entries:
            named = pods.get((namespace, ref)) if ref else None
            pod = named if named is not None and ip in named.ips else by_ip.get(ip)
            raw_eps.setdefault(key, []).append((ip, port, pod))
            if pod is None:
                continue
            svc = services.get((key[0], key[1]))
            declared = next((p for p in svc.ports if p.name == key[2]), None) if svc else None
            if declared is not None and declared.protocol == "tcp":
                server_first.setdefault((pod.namespace, pod.name), set()).add(port)
    sf = {k: frozenset(v) for k, v in server_first.items()}
    endpoints: dict[tuple[str, str, str], tuple[Endpoint, ...]] = {}
    for key, items in raw_eps.items():
        eps = {_endpoint(memo, ip, port, pod, sf, trust_domain) for ip, port, pod in items}
        endpoints[key] = tuple(sorted(eps, key=lambda e: (e.ip, e.port)))
    if cache is not None:
        memo.sweep()
    return MeshModel(
        trust_domain,
        services,
        endpoints,
        pods,
        sf,
        _meshed(pods, sf),
        by_ip,
        namespace_settings(objects.get("Namespace", ())),
    )


def update_endpoints(
    model: MeshModel,
    service: tuple[str, str],
    slices: Iterable[Mapping[str, Any]],
    cache: Memo,
) -> MeshModel | None:
    """``model`` with the endpoints of one Service recomputed from its ``slices`` (the fast path
    of an endpoint change). None when a full build is needed: the Service has a declared-TCP
    port, whose endpoints decide which pod ports skip sniffing (listener config)."""
    svc = model.services.get(service)
    if svc is not None and any(p.protocol == "tcp" for p in svc.ports):
        return None
    raw: dict[tuple[str, str, str], list[Endpoint]] = {}
    for obj in slices:
        namespace, entries = slice_entries(obj)  # new objects: no point caching them
        for key, ip, port, ref in entries:
            if (key[0], key[1]) != service:
                return None
            named = model.pods.get((namespace, ref)) if ref else None
            pod = named if named is not None and ip in named.ips else model.by_ip.get(ip)
            ep = _endpoint(cache, ip, port, pod, model.server_first, model.trust_domain)
            raw.setdefault(key, []).append(ep)
    namespace, name = service  # compared apart: no tuple per entry of the whole mesh
    endpoints = {k: v for k, v in model.endpoints.items() if k[1] != name or k[0] != namespace}
    for key, eps in raw.items():
        endpoints[key] = tuple(sorted(set(eps), key=lambda e: (e.ip, e.port)))
    return dataclasses.replace(model, endpoints=endpoints)


_NONE: Final[frozenset[int]] = frozenset()


def _meshed(
    pods: Mapping[tuple[str, str], PodInfo], server_first: Mapping[tuple[str, str], frozenset[int]]
) -> dict[str, frozenset[int]]:
    out: dict[str, frozenset[int]] = {}
    for key, pod in pods.items():
        if not pod.meshed:
            continue
        plain = pod.uncaptured_ports
        if pod.inbound_mtls == "PERMISSIVE" and key in server_first:
            plain = plain | server_first[key]
        for ip in pod.ips:
            out[ip] = plain or _NONE
    return out


def _endpoint(
    memo: Memo,
    ip: str,
    port: int,
    pod: PodInfo | None,
    server_first: Mapping[tuple[str, str], frozenset[int]],
    trust_domain: str,
) -> Endpoint:
    if pod is None:
        return memo.endpoint(ip, port, None, None)
    workload = (workload_name(pod.name, pod.labels), pod.namespace)
    if not pod.meshed or not pod.captures(port):
        return memo.endpoint(ip, port, None, pod.name, workload)
    if pod.inbound_mtls == "PERMISSIVE" and port in server_first.get((pod.namespace, pod.name), ()):
        return memo.endpoint(ip, port, None, pod.name, workload)
    identity = spiffe_id(trust_domain, pod.namespace, pod.service_account)
    return memo.endpoint(ip, port, identity, pod.name, workload)
