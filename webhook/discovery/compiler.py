"""From the mesh model to one sidecar's Envoy resources (plain dicts in Envoy's JSON shape).

Pure. What a sidecar gets:

* one EDS cluster per Service port, with per-endpoint auto-mTLS, and the clusters every
  sidecar has (:mod:`webhook.discovery.clusters`);
* one RouteConfiguration per HTTP-capable Service port, named like its cluster
  (:mod:`webhook.discovery.l7`);
* the outbound listener by original destination and the inbound listener
  (:mod:`webhook.discovery.listeners`).

The push engine builds the same resources piece by piece and caches them (``shared`` and
``views``); :func:`proxy_resources` builds them all at once for tests, goldens and
``proxy-config``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from webhook.config import DEFAULTS, TelemetryConfig
from webhook.dataplane import bootstrap as bs
from webhook.discovery import l7
from webhook.discovery.clusters import build_cluster, build_endpoints, local_clusters
from webhook.discovery.listeners import build_listeners
from webhook.discovery.model import MeshModel, PodInfo, Service

__all__ = [
    "CLUSTER",
    "ENDPOINTS",
    "LISTENER",
    "ROUTE",
    "ProxyResources",
    "proxy_options",
    "proxy_resources",
]

CLUSTER: Final = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINTS: Final = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER: Final = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE: Final = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"


@dataclass(frozen=True)
class ProxyResources:
    """One sidecar's resources by type URL, then by name (Envoy JSON dicts)."""

    clusters: dict[str, dict[str, Any]]
    endpoints: dict[str, dict[str, Any]]
    listeners: dict[str, dict[str, Any]]
    routes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def by_type(self) -> dict[str, dict[str, dict[str, Any]]]:
        return {
            CLUSTER: self.clusters,
            ENDPOINTS: self.endpoints,
            LISTENER: self.listeners,
            ROUTE: self.routes,
        }


def proxy_options(
    pod: PodInfo,
    *,
    trust_domain: str,
    plaintext_ports: tuple[int, ...],
    ports: Any = None,
    **paths: str,
) -> bs.BootstrapOptions:
    """The bootstrap options a pod's dynamic listeners are built with (``paths``: ``cert_dir``
    and ``work_dir`` where the agent keeps them, the same for every sidecar)."""
    v6 = any(":" in ip for ip in pod.ips)
    v4 = any(":" not in ip for ip in pod.ips) or not pod.ips
    kwargs: dict[str, Any] = dict(paths) if ports is None else {"ports": ports, **paths}
    return bs.BootstrapOptions(
        pod_name=pod.name,
        pod_namespace=pod.namespace,
        service_account=pod.service_account,
        trust_domain=trust_domain,
        inbound_mtls=pod.inbound_mtls,
        plaintext_ports=plaintext_ports,
        ipv6=v6,
        ipv4=v4,
        **kwargs,
    )


def proxy_resources(
    model: MeshModel,
    opts: bs.BootstrapOptions,
    pod: PodInfo,
    services: Iterable[Service],
    telemetry: TelemetryConfig = DEFAULTS.telemetry,
) -> ProxyResources:
    """Everything one sidecar gets (the un-cached path: tests, goldens, proxy-config)."""
    services = list(services)
    clusters = local_clusters(opts, telemetry)
    endpoints: dict[str, dict[str, Any]] = {}
    routes: dict[str, dict[str, Any]] = {}
    for svc in services:
        for port in svc.ports:
            eps = model.endpoints_of(svc, port)
            name = svc.cluster_name(port)
            clusters[name] = build_cluster(svc, port, eps, opts)
            endpoints[name] = build_endpoints(name, eps)
            if svc.cluster_ips and l7.is_http(port):
                routes[name] = l7.route_config(svc, port)
    listeners = build_listeners(model, opts, pod, services, telemetry=telemetry)
    return ProxyResources(clusters, endpoints, listeners, routes)
