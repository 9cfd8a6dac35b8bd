"""The mesh as the compiler needs it: services, their endpoints and which pods carry a sidecar.

Pure, frozen values; nothing here knows about Envoy. :mod:`webhook.discovery.objects` reads them
from Kubernetes objects and :func:`webhook.discovery.build.build_model` assembles the model
(which endpoint of which Service port is which pod, and which of them get mTLS).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "Endpoint",
    "MeshModel",
    "PodInfo",
    "Protocol",
    "Service",
    "ServicePort",
]

#: How a Service port is proxied: HTTP, declared TCP (never sniffed) or unknown (sniffed).
Protocol = Literal["http", "tcp", "sniff"]


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
    #: Each namespace's ``telemetry.sidemesh.io/…`` annotations (defaults for its pods).
    namespace_telemetry: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def endpoints_of(self, svc: Service, port: ServicePort) -> tuple[Endpoint, ...]:
        return self.endpoints.get((svc.namespace, svc.name, port.name), ())

    def meshed_pod_ports(self) -> Mapping[str, frozenset[int]]:
        """Each meshed pod IP → its inbound ports that are plaintext."""
        return self.meshed
