"""The mesh as the compiler needs it: services, their endpoints and which pods carry a sidecar.

Pure: :func:`build_model` reads plain Kubernetes objects (as the store holds them) and returns
frozen values; nothing here knows about Envoy. Bad or partial objects (a Service without
ports, an EndpointSlice naming no Service) are skipped, never fatal: one odd object must not
stop the mesh from being programmed.

Protocols. A Service port's protocol comes from ``appProtocol``, else from its name
(``<protocol>`` or ``<protocol>-<suffix>``, as Istio reads it). ``http``, ``http2``, ``h2c``,
``grpc``, ``grpc-web`` … are HTTP; ``tcp``, ``tls``, ``https``, ``mysql``, ``mongo``,
``redis`` … are declared TCP (often server-first: the server speaks before the client), which
is never sniffed; anything else is ``sniff`` (the proxy peeks at the first bytes).

Auto-mTLS. An endpoint gets mTLS when its pod carries the ``sidemesh.io/status`` annotation
(the injector's record) and the port is captured on its side: not excluded from inbound
capture, and not a declared-TCP port of a PERMISSIVE pod. The latter is plaintext because a
PERMISSIVE proxy would have to wait for the client's first bytes to tell TLS from plaintext,
and a server-first client never sends any (see the discovery docs).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from webhook import names
from webhook.config import DEFAULTS
from webhook.inject.annotations import EXCLUDE_INBOUND_PORTS, INBOUND_MTLS, INCLUDE_INBOUND_PORTS
from webhook.telemetry.settings import ANNOTATION_PREFIX as TELEMETRY_PREFIX
from webhook.telemetry.workload import workload_name
from webhook.values import parse_port_list

__all__ = [
    "DEPENDENCIES",
    "Endpoint",
    "Memo",
    "MeshModel",
    "PodInfo",
    "Protocol",
    "Service",
    "ServicePort",
    "build_model",
    "protocol_of",
    "spiffe_id",
    "update_endpoints",
]

Protocol = Literal["http", "tcp", "sniff"]
#: Pod annotation: services this workload calls, declared up front ("ns/name" or "name" for
#: the pod's own namespace, comma-separated).
DEPENDENCIES: Final = "sidemesh.io/dependencies"
SLICE_SERVICE_LABEL: Final = "kubernetes.io/service-name"

_HTTP: Final = frozenset(
    {"http", "http2", "h2c", "grpc", "grpc-web", "kubernetes.io/h2c", "kubernetes.io/ws"}
)
_TCP: Final = frozenset(
    {
        "tcp",
        "tls",
        "https",
        "mysql",
        "mysqlx",
        "mongo",
        "redis",
        "postgres",
        "postgresql",
        "amqp",
        "kafka",
        "smtp",
        "ftp",
        "nats",
        "zookeeper",
        "memcached",
        "cassandra",
        "kubernetes.io/wss",
    }
)


def protocol_of(app_protocol: str | None, port_name: str | None) -> Protocol:
    """HTTP, declared TCP, or unknown (``sniff``) for one Service port."""
    candidates: list[str] = []
    if app_protocol:
        candidates.append(app_protocol.strip().lower())
    if port_name:
        name = port_name.strip().lower()
        candidates.append(name if name in _HTTP or name in _TCP else name.split("-", 1)[0])
    for value in candidates:
        if value in _HTTP:
            return "http"
        if value in _TCP:
            return "tcp"
    return "sniff"


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


@dataclass(frozen=True)
class ServicePort:
    name: str
    port: int
    protocol: Protocol


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    cluster_ips: tuple[str, ...]
    ports: tuple[ServicePort, ...]

    @property
    def host(self) -> str:
        return f"{self.name}.{self.namespace}.svc.cluster.local"

    def cluster_name(self, port: ServicePort) -> str:
        return f"outbound|{port.port}||{self.host}"


@dataclass(frozen=True)
class Endpoint:
    ip: str
    port: int
    #: The SPIFFE id the client verifies, or None for plaintext (no sidecar, or not captured).
    mtls_identity: str | None
    pod: str | None = None
    #: The pod's workload and namespace, as telemetry names them (None: no pod known).
    workload: tuple[str, str] | None = None


@dataclass(frozen=True)
class PodInfo:
    namespace: str
    name: str
    ips: tuple[str, ...]
    service_account: str
    meshed: bool
    inbound_mtls: Literal["PERMISSIVE", "STRICT"]
    #: Inbound ports the sidecar never sees (excluded from capture).
    uncaptured_ports: frozenset[int] = frozenset()
    #: Inbound ports only captured when listed (None: every port).
    captured_only: frozenset[int] | None = None
    dependencies: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    #: The pod's ``telemetry.sidemesh.io/…`` annotations (its own telemetry settings).
    telemetry: Mapping[str, str] = field(default_factory=dict)

    def captures(self, port: int) -> bool:
        if port in self.uncaptured_ports:
            return False
        return self.captured_only is None or port in self.captured_only


@dataclass(frozen=True)
class MeshModel:
    trust_domain: str
    services: Mapping[tuple[str, str], Service]
    #: ``(namespace, service, port name)`` → ready endpoints, sorted.
    endpoints: Mapping[tuple[str, str, str], tuple[Endpoint, ...]]
    pods: Mapping[tuple[str, str], PodInfo]
    #: Declared-TCP target ports by pod (``(namespace, name)``): these ports skip sniffing.
    server_first: Mapping[tuple[str, str], frozenset[int]]
    #: Each meshed pod IP → its inbound ports that are plaintext (see the module doc).
    meshed: Mapping[str, frozenset[int]] = field(default_factory=dict)
    by_ip: Mapping[str, PodInfo] = field(default_factory=dict)

    def endpoints_of(self, svc: Service, port: ServicePort) -> tuple[Endpoint, ...]:
        return self.endpoints.get((svc.namespace, svc.name, port.name), ())

    def meshed_pod_ports(self) -> Mapping[str, frozenset[int]]:
        """Each meshed pod IP → its inbound ports that are plaintext."""
        return self.meshed


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
        pod = memo.get(obj, lambda o: _pod(o, default_inbound_mtls))
        if pod is not None:
            pods[(pod.namespace, pod.name)] = pod
    by_ip = {ip: pod for pod in pods.values() for ip in pod.ips}
    services: dict[tuple[str, str], Service] = {}
    for obj in objects.get("Service", ()):
        svc = memo.get(obj, _service)
        if svc is not None:
            services[(svc.namespace, svc.name)] = svc
    raw_eps: dict[tuple[str, str, str], list[tuple[str, int, PodInfo | None]]] = {}
    server_first: dict[tuple[str, str], set[int]] = {}
    for obj in objects.get("EndpointSlice", ()):
        namespace, entries = memo.get(obj, _slice_entries)
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
    return MeshModel(trust_domain, services, endpoints, pods, sf, _meshed(pods, sf), by_ip)


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
        namespace, entries = _slice_entries(obj)  # new objects: no point caching them
        for key, ip, port, ref in entries:
            if (key[0], key[1]) != service:
                return None
            named = model.pods.get((namespace, ref)) if ref else None
            pod = named if named is not None and ip in named.ips else model.by_ip.get(ip)
            ep = _endpoint(cache, ip, port, pod, model.server_first, model.trust_domain)
            raw.setdefault(key, []).append(ep)
    endpoints = {k: v for k, v in model.endpoints.items() if (k[0], k[1]) != service}
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


# --- reading objects ---------------------------------------------------------------------


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _str_map(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def _ips(values: Iterable[Any]) -> tuple[str, ...]:
    out: list[str] = []
    for raw in values:
        try:
            ip = str(ipaddress.ip_address(str(raw)))
        except ValueError:
            continue
        if ip not in out:
            out.append(ip)
    return tuple(out)


def _pod(obj: Mapping[str, Any], default_mode: Literal["PERMISSIVE", "STRICT"]) -> PodInfo | None:
    meta = _meta(obj)
    spec = obj.get("spec") if isinstance(obj.get("spec"), Mapping) else {}
    status = obj.get("status") if isinstance(obj.get("status"), Mapping) else {}
    assert isinstance(spec, Mapping) and isinstance(status, Mapping)
    if status.get("phase") in ("Succeeded", "Failed"):
        return None
    ann = _str_map(meta.get("annotations"))
    raw_ips = [p.get("ip") for p in status.get("podIPs") or [] if isinstance(p, Mapping)]
    ips = _ips(raw_ips or [status.get("podIP")])
    mode = _inbound_mode(spec, ann) or default_mode
    return PodInfo(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        ips=ips,
        service_account=str(spec.get("serviceAccountName") or names.DEFAULT_SERVICE_ACCOUNT),
        meshed=names.STATUS in ann,
        inbound_mtls=mode,
        uncaptured_ports=_ports(ann.get(EXCLUDE_INBOUND_PORTS)) or frozenset(),
        captured_only=_ports(ann.get(INCLUDE_INBOUND_PORTS)),
        dependencies=tuple(d.strip() for d in ann.get(DEPENDENCIES, "").split(",") if d.strip()),
        labels=_str_map(meta.get("labels")),
        telemetry={k: v for k, v in ann.items() if k.startswith(TELEMETRY_PREFIX)},
    )


def _ports(raw: str | None) -> frozenset[int] | None:
    if raw is None:
        return None
    try:
        parsed = parse_port_list(raw, allow_all=True)
    except ValueError:
        return None
    return None if isinstance(parsed, str) else frozenset(parsed)


def _inbound_mode(spec: Mapping[str, Any], ann: Mapping[str, str]) -> Any:
    """What the injector gave the proxy (its environment), else the pod's annotation."""
    for key in ("initContainers", "containers"):
        for c in spec.get(key) or []:
            if not isinstance(c, Mapping) or c.get("name") != names.PROXY_CONTAINER:
                continue
            for env in c.get("env") or []:
                if isinstance(env, Mapping) and env.get("name") == names.ENV_INBOUND_MTLS:
                    value = str(env.get("value", "")).upper()
                    if value in ("PERMISSIVE", "STRICT"):
                        return value
    value = ann.get(INBOUND_MTLS, "").upper()
    return value if value in ("PERMISSIVE", "STRICT") else None


def _service(obj: Mapping[str, Any]) -> Service | None:
    meta = _meta(obj)
    spec = obj.get("spec")
    if not isinstance(spec, Mapping) or spec.get("type") == "ExternalName":
        return None
    ips = spec.get("clusterIPs") or [spec.get("clusterIP")]
    ports: list[ServicePort] = []
    for raw in spec.get("ports") or []:
        if not isinstance(raw, Mapping) or raw.get("protocol", "TCP") != "TCP":
            continue
        port = raw.get("port")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            continue
        name = str(raw.get("name") or "")
        ports.append(ServicePort(name, port, protocol_of(raw.get("appProtocol"), name)))
    if not ports:
        return None
    return Service(
        str(meta.get("namespace") or ""),
        str(meta.get("name") or ""),
        _ips(ip for ip in ips if ip and ip != "None"),
        tuple(ports),
    )


def _slice_entries(
    obj: Mapping[str, Any],
) -> tuple[str, list[tuple[tuple[str, str, str], str, int, str | None]]]:
    """``(namespace, [((ns, service, port name), ip, port, targetRef pod name)])``."""
    meta = _meta(obj)
    namespace = str(meta.get("namespace") or "")
    service = _str_map(meta.get("labels")).get(SLICE_SERVICE_LABEL)
    out: list[tuple[tuple[str, str, str], str, int, str | None]] = []
    if not service:
        return namespace, out
    ports = [
        (str(p.get("name") or ""), p.get("port"))
        for p in obj.get("ports") or []
        if isinstance(p, Mapping) and p.get("protocol", "TCP") == "TCP"
    ]
    for ep in obj.get("endpoints") or []:
        if not isinstance(ep, Mapping) or not _ready(ep.get("conditions")):
            continue
        ref = ep.get("targetRef") if isinstance(ep.get("targetRef"), Mapping) else None
        ref_name = str(ref.get("name")) if ref and ref.get("kind", "Pod") == "Pod" else None
        for ip in _ips(ep.get("addresses") or []):
            for port_name, port in ports:
                if isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535:
                    out.append(((namespace, service, port_name), ip, port, ref_name))
    return namespace, out


def _ready(conditions: Any) -> bool:
    # Kubernetes: a nil "ready" means ready. Terminating endpoints are not ready, so they leave
    # the load-balancing set at once while their open connections finish.
    if not isinstance(conditions, Mapping):
        return True
    return conditions.get("ready") is not False
