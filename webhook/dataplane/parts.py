"""The pieces every sidecar resource is made of, shared by the static bootstrap
(:mod:`webhook.dataplane.bootstrap`), its listeners (:mod:`webhook.dataplane.listeners`) and
the control plane's compiler: the facts of one sidecar (:class:`BootstrapOptions`), the names
and type URLs, the TLS contexts of the mTLS hop, the TCP proxy, the HTTP connection manager and
the clusters every sidecar has. Pure.

The names with a leading underscore are shared inside sidemesh (the static and the discovered
data plane must build the same things the same way), not an API for anything else.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from webhook import names
from webhook.config import DEFAULTS, InboundMTLS, Ports
from webhook.dataplane.capture import INBOUND_PASSTHROUGH_SOURCE_V6

#: ALPN values our outbound side offers so the inbound side knows what it carries: HTTP/1.x,
#: HTTP/2 (h2c from the app, gRPC) or other TCP.
ALPN_HTTP: Final = "sidemesh-http"
ALPN_H2: Final = "sidemesh-h2"
ALPN_TCP: Final = "sidemesh-tcp"
#: SDS resource names: the workload certificate + key, and the mesh root.
CERT_SECRET: Final = "default"
ROOT_SECRET: Final = "ROOTCA"
#: The files in the certificate directory Envoy reads (symlinks into ``..data``).
CERT_FILE: Final = "cert.pem"
KEY_FILE: Final = "key.pem"
ROOT_FILE: Final = "ca.crt"

#: What ``http_inspector`` reports for the app's first bytes (it knows no other values).
_HTTP1_PROTOCOLS: Final = ["http/1.0", "http/1.1"]
_H2C_PROTOCOLS: Final = ["h2c"]
_HTTP_PROTOCOLS: Final = [*_HTTP1_PROTOCOLS, *_H2C_PROTOCOLS]
#: ``max_connections`` etc. of every cluster: Envoy's default (1024) would cap a busy pod's
#: connections through one ORIGINAL_DST cluster, which the app never had without the mesh.
_UNLIMITED: Final = 4294967295
_TYPE = "@type"
_T_TLS_UP = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_T_TLS_DOWN = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
_T_HCM = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)
_T_TCP = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
_T_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_T_ORIG_DST = "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
_T_TLS_INSPECTOR = (
    "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
)
_T_HTTP_INSPECTOR = (
    "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"
)
_T_HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_T_SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
_T_MAX_CX = (
    "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3."
    "DownstreamConnectionsConfig"
)
#: Envoy's overload manager refuses new downstream connections above this.
MAX_DOWNSTREAM_CONNECTIONS: Final = 65536


@dataclass(frozen=True)
class BootstrapOptions:
    """The facts one sidecar's bootstrap depends on (all plain values; the agent gathers them)."""

    pod_name: str
    pod_namespace: str
    service_account: str
    trust_domain: str = DEFAULTS.trust_domain
    inbound_mtls: InboundMTLS = DEFAULTS.inbound_mtls
    mesh_cidrs: tuple[str, ...] = DEFAULTS.mesh_cidrs
    cert_dir: str = names.CERTS_DIR
    work_dir: str = names.WORK_DIR
    ports: Ports = field(default_factory=Ports)
    #: Listener-filter budget for protocol sniffing: a server-first protocol (the server
    #: speaks first) waits this long before being proxied as plain TCP.
    sniff_timeout_ms: int = 1000
    #: The pod has an IPv6 address: every listener also listens on its IPv6 twin address.
    ipv6: bool = False
    #: The pod has an IPv4 address (False only for an IPv6-only pod).
    ipv4: bool = True
    #: Destination ports that are plain passthrough whatever the address (mesh config).
    plaintext_ports: tuple[int, ...] = DEFAULTS.plaintext_ports
    #: ``(ip, port)`` of the Kubernetes API server's Service: plain passthrough, never mTLS.
    api_servers: tuple[tuple[str, int], ...] = ()

    @property
    def spiffe_id(self) -> str:
        """This pod's SPIFFE id (ValueError when a part cannot be one)."""
        return names.spiffe_id(self.trust_domain, self.pod_namespace, self.service_account)


def sds_dir(work_dir: str) -> str:
    """Where the (static) SDS resource files live inside the work directory."""
    return f"{work_dir}/sds"


def _addr(ip: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": ip, "port_value": port}}


#: Each listener address and its IPv6 twin (loopback stays loopback, "any" stays "any").
_V6_TWIN: Final = {"127.0.0.1": "::1", "0.0.0.0": "::"}


def _listen(opts: BootstrapOptions, ip: str, port: int) -> dict[str, Any]:
    """``address`` (and ``additional_addresses``) of a listener on ``ip:port`` in this pod's
    families. An IPv6-only pod still has 127.0.0.1 on lo, so the IPv4 address always stays the
    main one: the listener, its stats and the goldens of IPv4 pods do not change."""
    out: dict[str, Any] = {"address": _addr(ip, port)}
    if opts.ipv6:
        out["additional_addresses"] = [{"address": _addr(_V6_TWIN[ip], port)}]
    return out


def _cidr_ranges(cidrs: tuple[str, ...]) -> list[dict[str, Any]]:
    out = []
    for cidr in cidrs:
        net = ipaddress.ip_network(cidr, strict=True)
        out.append({"address_prefix": str(net.network_address), "prefix_len": net.prefixlen})
    return out


def _sds(opts: BootstrapOptions, name: str, file: str) -> dict[str, Any]:
    return {
        "name": name,
        "sds_config": {
            "path_config_source": {"path": f"{sds_dir(opts.work_dir)}/{file}"},
            "resource_api_version": "V3",
        },
    }


def _common_tls(opts: BootstrapOptions, alpn: list[str]) -> dict[str, Any]:
    """Both directions: TLS 1.3 only (both ends are our Envoys), the workload certificate, and
    a peer that chains to the mesh root *and* carries a SPIFFE id of our trust domain."""
    ctx: dict[str, Any] = {
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            # Envoy's client side stops at TLS 1.2 unless the maximum is set explicitly.
            "tls_maximum_protocol_version": "TLSv1_3",
        },
        "tls_certificate_sds_secret_configs": [_sds(opts, CERT_SECRET, "cert.json")],
        "combined_validation_context": {
            "default_validation_context": {
                "match_typed_subject_alt_names": [
                    {
                        "san_type": "URI",
                        "matcher": {"prefix": names.trust_domain_prefix(opts.trust_domain)},
                    }
                ]
            },
            "validation_context_sds_secret_config": _sds(opts, ROOT_SECRET, "root.json"),
        },
    }
    if alpn:
        ctx["alpn_protocols"] = alpn
    return ctx


#: Connection attempts per proxied TCP connection. The sidecars relay at L4 (HTTP is only
#: parsed by the server's inbound side), so a failed upstream connect would otherwise reach the
#: app as a reset: a refused connection, or a TLS handshake cut while the peer's listener
#: swaps its certificate, is tried again before the caller sees anything.
TCP_CONNECT_ATTEMPTS: Final = 3
#: Pause between those attempts (jittered, doubling up to the max): a peer swapping its
#: certificate can fail handshakes for a few milliseconds, longer than three immediate tries.
TCP_CONNECT_BACKOFF: Final = {"base_interval": "0.05s", "max_interval": "0.4s"}


def _tcp_proxy(stat_prefix: str, cluster: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            _TYPE: _T_TCP,
            "stat_prefix": stat_prefix,
            "cluster": cluster,
            "max_connect_attempts": TCP_CONNECT_ATTEMPTS,
            "backoff_options": dict(TCP_CONNECT_BACKOFF),
        },
    }


def _http_manager(
    stat_prefix: str,
    cluster: str,
    *,
    forward_client_cert: Literal["SANITIZE", "SANITIZE_SET"],
    codec: Literal["AUTO", "HTTP1", "HTTP2"] = "AUTO",
    routes: list[dict[str, Any]] | None = None,
    route_config_name: str | None = None,
    filters: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """``route_config_name``: routes come over RDS (ADS) instead of the inline default route;
    ``filters``: HTTP filters that run before the router."""
    config: dict[str, Any] = {
        _TYPE: _T_HCM,
        "stat_prefix": stat_prefix,
        "codec_type": codec,
        # Transparent: no request ids, no envoy headers, the app's own Server header.
        "generate_request_id": False,
        "server_header_transformation": "PASS_THROUGH",
        # No idle cut-off the app did not have without the mesh (long polls, streams).
        "stream_idle_timeout": "0s",
        "forward_client_cert_details": forward_client_cert,
        "route_config": {
            "name": stat_prefix,
            "virtual_hosts": [
                {
                    "name": stat_prefix,
                    "domains": ["*"],
                    "routes": routes
                    or [{"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "0s"}}],
                }
            ],
        },
        "upgrade_configs": [{"upgrade_type": "websocket"}],
        "http_filters": [
            *(filters or []),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {_TYPE: _T_ROUTER, "suppress_envoy_headers": True},
            },
        ],
    }
    if route_config_name is not None:
        del config["route_config"]
        config["rds"] = {
            "config_source": {"ads": {}, "resource_api_version": "V3"},
            "route_config_name": route_config_name,
        }
    if codec != "HTTP2":
        # HTTP/1.0 clients (curl --http1.0, old health checkers) were answered 426 otherwise;
        # they must send Host: Envoy routes nothing without one.
        config["http_protocol_options"] = {"accept_http_10": True}
    if forward_client_cert == "SANITIZE_SET":
        # The app sees: x-forwarded-client-cert: By=<our id>;Hash=…;URI=<caller's SPIFFE id>
        config["set_current_client_cert_details"] = {"uri": True}
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": config}


def _listener_filter(name: str, type_url: str) -> dict[str, Any]:
    return {"name": name, "typed_config": {_TYPE: type_url}}


def _circuit_breakers() -> dict[str, Any]:
    limit = {
        "max_connections": _UNLIMITED,
        "max_pending_requests": _UNLIMITED,
        "max_requests": _UNLIMITED,
        "max_retries": _UNLIMITED,
    }
    return {"thresholds": [limit]}


def _original_dst_cluster(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "5s",
        "circuit_breakers": _circuit_breakers(),
    }


def _mesh_cluster(name: str, opts: BootstrapOptions, alpn: str) -> dict[str, Any]:
    # Both mesh clusters are TCP proxies on this side; only the ALPN value differs, and it
    # tells the peer's inbound listener whether to speak HTTP to its app.
    cluster = _original_dst_cluster(name)
    cluster["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {_TYPE: _T_TLS_UP, "common_tls_context": _common_tls(opts, [alpn])},
    }
    return cluster


def _inbound_app_cluster(opts: BootstrapOptions) -> dict[str, Any]:
    cluster = _original_dst_cluster("inbound_app")
    # The hop to the app comes from 127.0.0.6, which the capture rules let through: without it
    # Envoy's own connection to <podIP>:port over lo would be captured again.
    bind: dict[str, Any] = {
        "source_address": {"address": names.INBOUND_PASSTHROUGH_SOURCE, "port_value": 0}
    }
    if opts.ipv6:
        # An IPv6 connection is handed to the app at [podIPv6]:port from ::6 (assigned to lo
        # by init-traffic); Envoy picks the source of the destination's family.
        v6 = {"address": INBOUND_PASSTHROUGH_SOURCE_V6, "port_value": 0}
        bind["extra_source_addresses"] = [{"address": v6}]
    cluster["upstream_bind_config"] = bind
    # HTTP from the HTTP chains goes to the app in the protocol the caller spoke.
    cluster["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            _TYPE: _T_HTTP_OPTIONS,
            "use_downstream_protocol_config": {
                "http_protocol_options": {},
                "http2_protocol_options": {},
            },
        }
    }
    return cluster
