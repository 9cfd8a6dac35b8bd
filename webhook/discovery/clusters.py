"""The clusters and endpoints of a Service port, and the clusters every sidecar has.

Pure. One EDS cluster per Service port, ``outbound|<port>||<svc>.<ns>.svc.cluster.local``,
round robin, the same for every proxy that sees the Service (the push engine encodes it once).
Its endpoints carry ``envoy.transport_socket_match`` metadata: ``tlsMode: mutual_tls`` for a
meshed endpoint, ``none`` for the others, and the endpoint's workload (for the client's
metrics). The cluster's ``transport_socket_matches`` hold one mTLS socket per server identity
among its endpoints (verifying exactly that SPIFFE id); unmatched endpoints get the plaintext
default. So a meshed client talks mTLS to meshed replicas and plaintext to the rest of the same
Service. When all meshed endpoints share one identity (the usual case) the match is the
``tlsMode`` alone and the endpoints do not repeat the identity: every metadata key an endpoint
carries costs each sidecar work on every update of the Service's endpoints.
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

#: Envoy's metadata namespace for ``transport_socket_matches`` (telemetry's keys share it).
TLS_MATCH_KEY: Final = tm.ENDPOINT_METADATA
_ADS = {"ads": {}, "resource_api_version": "V3"}


def build_cluster(
    svc: Service, port: ServicePort, endpoints: Iterable[Endpoint], opts: bs.BootstrapOptions
) -> dict[str, Any]:
    name = svc.cluster_name(port)
    # The default; HTTP chains set the ALPN per connection (set_filter_state).
    alpn = bs.ALPN_TCP
    matches: list[dict[str, Any]] = []
    identities = _identities(endpoints)
    for identity in identities:
        ctx = bs._common_tls(opts, [alpn])
        # Exactly the server's identity, not any id of the trust domain.
        ctx["combined_validation_context"]["default_validation_context"] = {
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": identity}}]
        }
        matches.append(
            {
                "name": f"mtls-{len(matches)}",
                "match": _tls_labels(identity, identities),
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
    endpoints = list(endpoints)
    identities = _identities(endpoints)
    lb = []
    for ep in endpoints:
        workload = ep.workload[0] if ep.workload is not None else None
        meta = tm.endpoint_metadata(workload, bool(ep.mtls_identity))
        if ep.mtls_identity:
            meta.update(_tls_labels(ep.mtls_identity, identities))
        lb.append(
            {
                "endpoint": {"address": bs._addr(ep.ip, ep.port)},
                "metadata": {"filter_metadata": {TLS_MATCH_KEY: meta}},
            }
        )
    return {"cluster_name": name, "endpoints": [{"lb_endpoints": lb}] if lb else []}


def _identities(endpoints: Iterable[Endpoint]) -> list[str]:
    return sorted({e.mtls_identity for e in endpoints if e.mtls_identity})


def _tls_labels(identity: str, identities: list[str]) -> dict[str, str]:
    """What an mTLS socket matches (and a meshed endpoint carries): the identity only when
    the cluster has more than one."""
    if len(identities) == 1:
        return {"tlsMode": tm.MUTUAL_TLS}
    return {"tlsMode": tm.MUTUAL_TLS, "identity": identity}


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
