"""The sidecar's Envoy bootstrap in ADS mode: listeners and clusters come from the control plane.

Static, as in the fallback bootstrap (:mod:`webhook.dataplane.bootstrap`, which builds them):
admin on 127.0.0.1:15000, health ``/healthz/ready`` on 15021, ``/stats/prometheus`` on 15090,
the overload manager, and the SDS files of the workload certificate. One difference: 15090 is
answered by the agent (``agent`` cluster, its port 15020), which finishes Envoy's golden
metrics with ``reporter`` and the sidecar's own labels (:mod:`webhook.dataplane.scrape`).
Everything else — the capture listeners 15001/15006 and every cluster — arrives over one
delta ADS stream to the control plane (``xds`` cluster): HTTP/2 over mTLS with the workload
certificate, the control plane's certificate verified to chain to the mesh root *and* to
carry exactly its SPIFFE id.

``initial_fetch_timeout``: Envoy's ``/ready`` (so the pod's readiness) waits for the first
clusters and listeners. With a dead control plane it would wait forever; after this timeout the
pod turns ready without the capture listeners (its connections are refused, not black-holed)
and Envoy keeps retrying; the config arrives when the control plane does. The static bootstrap
(``SIDEMESH_PROXY_MODE=static``) remains for those who want no control plane at all.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Final

from webhook import names
from webhook.dataplane import bootstrap as bs

__all__ = ["AGENT_CLUSTER", "XDS_CLUSTER", "XdsOptions", "control_plane_id", "render_ads_bootstrap"]

XDS_CLUSTER: Final = "xds"
AGENT_CLUSTER: Final = "agent"
_T_H2 = bs._T_HTTP_OPTIONS
_STATIC_LISTENERS: Final = ("health", "stats")
_STATIC_CLUSTERS: Final = ("admin",)


def control_plane_id(trust_domain: str) -> str:
    """The SPIFFE id the control plane's xDS certificate carries (its service account)."""
    return names.spiffe_id(trust_domain, names.CONTROL_PLANE_NAMESPACE, names.DISCOVERY_NAME)


@dataclass(frozen=True)
class XdsOptions:
    """Where the control plane is and how long to wait for it before turning ready anyway."""

    address: str  # host:port ([v6]:port)
    identity: str = ""  # SPIFFE id to verify; default: control_plane_id(trust domain)
    initial_fetch_timeout_s: float = 10.0

    def host_port(self) -> tuple[str, int]:
        host, sep, port = self.address.rpartition(":")
        if not sep or not port.isdigit() or not host or not 1 <= int(port) <= 65535:
            raise ValueError(f"xDS address {self.address!r} is not host:port")
        return host.strip("[]"), int(port)


def _xds_cluster(opts: bs.BootstrapOptions, xds: XdsOptions) -> dict[str, Any]:
    host, port = xds.host_port()
    try:
        ipaddress.ip_address(host)
        kind = "STATIC"
    except ValueError:
        kind = "STRICT_DNS"
    ctx = bs._common_tls(opts, ["h2"])
    identity = xds.identity or control_plane_id(opts.trust_domain)
    ctx["combined_validation_context"]["default_validation_context"] = {
        "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": identity}}]
    }
    tls: dict[str, Any] = {bs._TYPE: bs._T_TLS_UP, "common_tls_context": ctx}
    if kind == "STRICT_DNS":
        tls["sni"] = host
    return {
        "name": XDS_CLUSTER,
        "type": kind,
        "connect_timeout": "5s",
        "dns_lookup_family": "V4_PREFERRED",
        "load_assignment": {
            "cluster_name": XDS_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": bs._addr(host, port)}}]}],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                bs._TYPE: _T_H2,
                "explicit_http_config": {
                    "http2_protocol_options": {
                        # Notice a dead control plane on a silent connection, and reconnect.
                        "connection_keepalive": {"interval": "30s", "timeout": "10s"}
                    }
                },
            }
        },
        "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": tls},
    }


def render_ads_bootstrap(opts: bs.BootstrapOptions, xds: XdsOptions) -> dict[str, Any]:
    """The bootstrap for one sidecar whose capture config comes over ADS."""
    if xds.initial_fetch_timeout_s <= 0:
        raise ValueError("initial_fetch_timeout must be positive (0 would wait forever)")
    boot = bs.render_bootstrap(opts)
    static = boot["static_resources"]
    # Scrapes of 15090 go through the agent, which finishes the golden metrics.
    static["listeners"] = [
        bs.stats_listener(opts, AGENT_CLUSTER) if x["name"] == "stats" else x
        for x in static["listeners"]
        if x["name"] in _STATIC_LISTENERS
    ]
    static["clusters"] = [c for c in static["clusters"] if c["name"] in _STATIC_CLUSTERS]
    static["clusters"].append(_xds_cluster(opts, xds))
    static["clusters"].append(bs.local_cluster(AGENT_CLUSTER, opts.ports.probes))
    fetch = f"{xds.initial_fetch_timeout_s:g}s"
    ads_source = {"ads": {}, "resource_api_version": "V3", "initial_fetch_timeout": fetch}
    boot["dynamic_resources"] = {
        "ads_config": {
            "api_type": "DELTA_GRPC",
            "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
            "set_node_on_first_message_only": True,
        },
        "cds_config": ads_source,
        "lds_config": ads_source,
    }
    return boot
