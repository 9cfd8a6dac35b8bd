"""What the mesh model reads from Kubernetes objects: Pods, Services and EndpointSlices.

Pure. Bad or partial objects (a Service without ports, an EndpointSlice naming no Service) read
as nothing, never fail: one odd object must not stop the mesh from being programmed.

Protocols. A Service port's protocol comes from ``appProtocol``, else from its name
(``<protocol>`` or ``<protocol>-<suffix>``, as Istio reads it). ``http``, ``http2``, ``h2c``,
``grpc``, ``grpc-web`` … are HTTP; ``tcp``, ``tls``, ``https``, ``mysql``, ``mongo``,
``redis`` … are declared TCP (often server-first: the server speaks before the client), which
is never sniffed; anything else is ``sniff`` (the proxy peeks at the first bytes).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal

from webhook import names
from webhook.discovery.model import PodInfo, Protocol, Service, ServicePort
from webhook.inject.annotations import EXCLUDE_INBOUND_PORTS, INBOUND_MTLS, INCLUDE_INBOUND_PORTS
from webhook.telemetry.settings import ANNOTATION_PREFIX as TELEMETRY_PREFIX
from webhook.values import parse_port_list

__all__ = [
    "DEPENDENCIES",
    "SLICE_SERVICE_LABEL",
    "SliceEntry",
    "protocol_of",
    "read_pod",
    "read_service",
    "slice_entries",
    "slice_service",
]

#: Pod annotation: services this workload calls, declared up front ("ns/name" or "name" for
#: the pod's own namespace, comma-separated).
DEPENDENCIES: Final = "sidemesh.io/dependencies"
SLICE_SERVICE_LABEL: Final = "kubernetes.io/service-name"
#: One ready address of an EndpointSlice for one of its ports:
#: ``((namespace, service, port name), ip, port, targetRef pod name)``.
SliceEntry = tuple[tuple[str, str, str], str, int, str | None]

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


def read_pod(
    obj: Mapping[str, Any], default_mode: Literal["PERMISSIVE", "STRICT"]
) -> PodInfo | None:
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


def read_service(obj: Mapping[str, Any]) -> Service | None:
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


def slice_service(obj: Mapping[str, Any]) -> tuple[str, str] | None:
    """The (namespace, name) of the Service an EndpointSlice belongs to (None: no label)."""
    meta = _meta(obj)
    name = _str_map(meta.get("labels")).get(SLICE_SERVICE_LABEL)
    return (str(meta.get("namespace") or ""), str(name)) if name else None


def slice_entries(obj: Mapping[str, Any]) -> tuple[str, list[SliceEntry]]:
    """The slice's namespace and its ready entries (none when it names no Service)."""
    meta = _meta(obj)
    namespace = str(meta.get("namespace") or "")
    service = _str_map(meta.get("labels")).get(SLICE_SERVICE_LABEL)
    out: list[SliceEntry] = []
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
