"""The clusters and endpoints of a Service port, and the clusters every sidecar has.

Pure. One EDS cluster per Service port, ``outbound|<port>||<svc>.<ns>.svc.cluster.local``,
round robin, the same for every proxy that sees the Service (the push engine encodes it once).
Its endpoints carry ``envoy.transport_socket_match`` metadata: ``tlsMode: sidemesh`` plus the
server's SPIFFE id for a meshed endpoint, nothing for the others. The cluster's
``transport_socket_matches`` hold one mTLS socket per identity among its endpoints (verifying
exactly that SPIFFE id); unmatched endpoints get the plaintext default. So a meshed client
talks mTLS to meshed replicas and plaintext to the rest of the same Service.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from webhook.config import DEFAULTS, TelemetryConfig
from webhook.dataplane import bootstrap as bs
from webhook.discovery import l7
from webhook.discovery.model import Endpoint, Service, ServicePort
from webhook.telemetry import instrument as tm
from webhook.telemetry.tracing import collector_cluster

__all__ = [
    "TLS_MATCH_KEY",
    "build_cluster",
    "build_endpoints",
    "local_clusters",
]

#: Envoy's metadata namespace for ``transport_socket_matches``.
TLS_MATCH_KEY: Final = "envoy.transport_socket_match"
TLS_MODE: Final = "sidemesh"
_ADS = {"ads": {}, "resource_api_version": "V3"}


def build_cluster(
    svc: Service, port: ServicePort, endpoints: Iterable[Endpoint], opts: bs.BootstrapOptions
) -> dict[str, Any]:
    name = svc.cluster_name(port)
    # The default; HTTP chains set the ALPN per connection (set_filter_state).
    alpn = bs.ALPN_TCP
    matches: list[dict[str, Any]] = []
    for identity in sorted({e.mtls_identity for e in endpoints if e.mtls_identity}):
        ctx = bs._common_tls(opts, [alpn])
        # Exactly the server's identity, not any id of the trust domain.
        ctx["combined_validation_context"]["default_validation_context"] = {
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": identity}}]
        }
        matches.append(
            {
                "name": f"mtls-{len(matches)}",
                "match": {"tlsMode": TLS_MODE, "identity": identity},
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {bs._TYPE: bs._T_TLS_UP, "common_tls_context": ctx},
                },
            }
        )
    cluster: dict[str, Any] = {
        "name": name,
        "type": "EDS",
        "eds_cluster_config": {"eds_config": _ADS, "service_name": name},
        "lb_policy": "ROUND_ROBIN",
        "connect_timeout": "5s",
        "circuit_breakers": bs._circuit_breakers(),
    }
    if matches:
        cluster["transport_socket_matches"] = matches
    if l7.is_http(port):
        cluster["typed_extension_protocol_options"] = l7.http_protocol_options()
    return cluster


def build_endpoints(name: str, endpoints: Iterable[Endpoint]) -> dict[str, Any]:
    lb = []
    for ep in endpoints:
        entry: dict[str, Any] = {"endpoint": {"address": bs._addr(ep.ip, ep.port)}}
        meta: dict[str, Any] = {}
        if ep.mtls_identity:
            meta[TLS_MATCH_KEY] = {"tlsMode": TLS_MODE, "identity": ep.mtls_identity}
        if ep.workload is not None:
            # Who the client's metrics say it called (telemetry reads it per request).
            workload, namespace = ep.workload
            meta[tm.ENDPOINT_METADATA] = tm.endpoint_metadata(
                workload, namespace, bool(ep.mtls_identity)
            )
        if meta:
            entry["metadata"] = {"filter_metadata": meta}
        lb.append(entry)
    return {"cluster_name": name, "endpoints": [{"lb_endpoints": lb}] if lb else []}


def local_clusters(
    opts: bs.BootstrapOptions, telemetry: TelemetryConfig = DEFAULTS.telemetry
) -> dict[str, dict[str, Any]]:
    """The clusters every sidecar has: passthrough, the two mesh clusters, the app hop (and
    the trace collector when tracing is on)."""
    out = [
        bs._mesh_cluster("outbound_mesh_http", opts, bs.ALPN_HTTP),
        bs._mesh_cluster("outbound_mesh_h2", opts, bs.ALPN_H2),
        bs._mesh_cluster("outbound_mesh_tcp", opts, bs.ALPN_TCP),
        bs._original_dst_cluster("passthrough"),
        bs._inbound_app_cluster(opts),
    ]
    collector = collector_cluster(telemetry)
    if collector is not None:
        out.append(collector)
    return {c["name"]: c for c in out}
