"""The Envoy bootstrap of the sidecar: a pure function of the pod's facts and the mesh config.

Everything is static (no xDS server): the listeners below never change while the pod lives,
and the only thing that does change, the workload certificate, reaches Envoy through
file-based secret discovery (SDS) from a directory it watches, so rotation needs no restart.

=========  ===============  ===============================================================
port       bound to         what
=========  ===============  ===============================================================
15001      127.0.0.1        outbound capture (iptables OUTPUT REDIRECT). The ``original_dst``
                            listener filter restores the destination; mesh CIDRs get mTLS
                            with the workload certificate, everything else plain passthrough
                            (and so do the API server and the always-plaintext ports, below).
15006      0.0.0.0          inbound capture (PREROUTING REDIRECT rewrites the destination to
                            the address of the interface, hence not 127.0.0.1). mTLS with a
                            client certificate from the mesh; plaintext too in PERMISSIVE.
                            The app is reached from 127.0.0.6 (exempt from capture).
15021      0.0.0.0          ``/healthz/ready`` → Envoy's own ``/ready``: 200 only once the
                            listeners (and so the certificate they wait for) are live.
15090      0.0.0.0          ``/stats/prometheus``.
15000      127.0.0.1        Envoy admin, never reachable from outside the pod.
15020      (the agent)      rewritten app probes are answered by ``sidemesh proxy`` itself,
                            not by Envoy: see :mod:`webhook.dataplane.probes`.
=========  ===============  ===============================================================

A pod with an IPv6 address (``BootstrapOptions.ipv6``: dual-stack or IPv6-only, as the agent
reads it from ``POD_IPS``) gets the IPv6 twin of each listener as an ``additional_addresses``
entry of the *same* listener — [::1]:15001, [::]:15006, [::]:15021, [::]:15090 — so both
families share one set of filter chains, stats and drain. ``init-traffic`` programs ip6tables
for such a pod: without these sockets every redirected IPv6 connection would be refused. The
hop to the app keeps its distinct source per family: 127.0.0.6, or ``::6`` for an IPv6
destination (``extra_source_addresses``: Envoy binds the one of the target's family).
``::6`` is not a loopback address in IPv6; ``init-traffic`` assigns ``::6/128`` to ``lo``
when it programs ip6tables (see :mod:`webhook.dataplane.netns`), which is what makes it bindable and
routed back inside the pod.

Why the outbound listener uses the ``original_dst`` *filter* rather than
``use_original_dst: true``: the latter hands a connection off to whichever of our own
listeners matches the original port, so an app scraping another pod's ``:15090`` or
``:15021`` would be answered by its *own* Envoy. With the filter, the connection stays on
15001 and the filter chains see the original destination.

Which destinations inside the mesh CIDRs stay plaintext, without discovery: the ports that
are never captured on a peer's side (15020/15021/15090), the mesh config's
``plaintext_ports`` (default 53: kube-dns answers large replies over TCP, and kube-system is
never injected), and the Kubernetes API server's Service address(es) (``api_servers``: the
agent reads ``KUBERNETES_SERVICE_HOST``/``_PORT``/``_PORT_HTTPS``, which the kubelet gives
every container). The API server has no sidecar, so wrapping an operator's own TLS in our
mTLS would break every call it makes. Envoy picks a filter chain by pruning, criterion by
criterion: destination port first (chains naming the port, if any does, else the port-less
ones), then the longest matching destination prefix among the survivors. So a chain with
``destination_port: 443`` and ``10.96.0.1/32`` takes 10.96.0.1:443 over the mesh CIDR, but it
also removes every port-less chain from the race for *any* address on :443: a meshed pod's
:443 would match nothing and be closed (seen with real traffic). Each API server port
therefore gets its own copy of the mesh and passthrough chains (``outbound-mesh-tcp-443`` …,
same stats and clusters), and only the exact address:port is exempt.

How the inbound side knows which protocol it is carrying after TLS: the outbound side sniffs the
app's first bytes (``http_inspector``) and announces what it found in ALPN, because only the
client side can see it (the inbound side gets TLS records):

=================  =========================  ==================================================
app's first bytes  ALPN on the mTLS hop       inbound side
=================  =========================  ==================================================
HTTP/1.0, 1.1      ``sidemesh-http``          HTTP connection manager, HTTP/1 codec
h2c preface        ``sidemesh-h2``            HTTP connection manager, HTTP/2 codec (gRPC)
anything else      ``sidemesh-tcp``           TCP proxy (bytes as they came)
=================  =========================  ==================================================

The codec is named, not ``AUTO``: ``AUTO`` decides by the *negotiated* ALPN on a TLS connection
(``h2`` means HTTP/2, anything else HTTP/1), so an h2c stream arriving with ALPN
``sidemesh-http`` was parsed as HTTP/1 and closed as a protocol error. The hop to the app then
speaks what the caller spoke (``use_downstream_protocol_config``): HTTP/2 with prior knowledge
to a gRPC server, HTTP/1.1 to everything else. Both connection managers set
``x-forwarded-client-cert`` with the caller's verified SPIFFE ID (and strip any copy the caller
sent). Plaintext HTTP accepted in PERMISSIVE mode goes through an ``AUTO`` connection manager
(without TLS, ``AUTO`` does look for the HTTP/2 preface), purely to strip a forged
``x-forwarded-client-cert``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from webhook import names
from webhook.config import DEFAULTS, INBOUND_MTLS_MODES, InboundMTLS, Ports
from webhook.dataplane.capture import INBOUND_PASSTHROUGH_SOURCE_V6
from webhook.values import check_port, parse_cidr

__all__ = [
    "ALPN_H2",
    "ALPN_HTTP",
    "ALPN_TCP",
    "CERT_SECRET",
    "ROOT_SECRET",
    "BootstrapOptions",
    "local_address_ip_version",
    "render_bootstrap",
    "render_sds",
    "sds_dir",
]

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


def local_address_ip_version(opts: BootstrapOptions) -> Literal["v4", "v6"]:
    """Envoy's ``--local-address-ip-version``: the family of the address Envoy reports as its
    own (e.g. in ``x-forwarded-for``). IPv4 whenever the pod has it, IPv6 for an IPv6-only pod."""
    return "v4" if opts.ipv4 or not opts.ipv6 else "v6"


def sds_dir(work_dir: str) -> str:
    """Where the (static) SDS resource files live inside the work directory."""
    return f"{work_dir}/sds"


def render_sds(opts: BootstrapOptions) -> dict[str, dict[str, Any]]:
    """The SDS files, by file name (relative to :func:`sds_dir`).

    They only *name* the PEM files; the PEMs sit behind symlinks in the certificate directory
    (``cert.pem`` → ``..data/cert.pem``), and the agent swaps ``..data`` atomically. Envoy
    watches that directory and rereads the pair on the move, checking that key and certificate
    were read consistently.
    """
    cert_dir = opts.cert_dir
    return {
        "cert.json": {
            "resources": [
                {
                    _TYPE: _T_SECRET,
                    "name": CERT_SECRET,
                    "tls_certificate": {
                        "certificate_chain": {"filename": f"{cert_dir}/{CERT_FILE}"},
                        "private_key": {"filename": f"{cert_dir}/{KEY_FILE}"},
                        "watched_directory": {"path": cert_dir},
                    },
                }
            ]
        },
        "root.json": {
            "resources": [
                {
                    _TYPE: _T_SECRET,
                    "name": ROOT_SECRET,
                    "validation_context": {
                        "trusted_ca": {"filename": f"{cert_dir}/{ROOT_FILE}"},
                        "watched_directory": {"path": cert_dir},
                    },
                }
            ]
        },
    }


def render_bootstrap(opts: BootstrapOptions) -> dict[str, Any]:
    """The whole Envoy bootstrap (JSON-able dict) for one sidecar."""
    _check(opts)
    ports = opts.ports
    return {
        "node": {
            "id": f"sidecar~{opts.pod_name}.{opts.pod_namespace}",
            "cluster": f"{opts.service_account}.{opts.pod_namespace}",
            "metadata": {"spiffe_id": opts.spiffe_id},
        },
        "admin": {"address": _addr("127.0.0.1", ports.admin)},
        # A ceiling on downstream connections (Envoy warns at start-up without one); far above
        # what one pod serves, it only stops a connection flood from exhausting the sidecar.
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        _TYPE: _T_MAX_CX,
                        "max_active_downstream_connections": MAX_DOWNSTREAM_CONNECTIONS,
                    },
                }
            ]
        },
        "static_resources": {
            "listeners": [
                _outbound_listener(opts),
                _inbound_listener(opts),
                _health_listener(opts),
                _stats_listener(opts),
            ],
            "clusters": [
                _mesh_cluster("outbound_mesh_http", opts, ALPN_HTTP),
                _mesh_cluster("outbound_mesh_h2", opts, ALPN_H2),
                _mesh_cluster("outbound_mesh_tcp", opts, ALPN_TCP),
                _original_dst_cluster("passthrough"),
                _inbound_app_cluster(opts),
                {
                    "name": "admin",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "admin",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {"endpoint": {"address": _addr("127.0.0.1", ports.admin)}}
                                ]
                            }
                        ],
                    },
                },
            ],
        },
    }


# --- checks ------------------------------------------------------------------------------


def _check(opts: BootstrapOptions) -> None:
    if not (opts.ipv4 or opts.ipv6):
        raise ValueError("a pod needs an IPv4 or an IPv6 address")
    for cidr in opts.mesh_cidrs:
        parse_cidr(cidr)  # ValueError names the bad one
    if opts.inbound_mtls not in INBOUND_MTLS_MODES:
        raise ValueError(
            f"inbound mTLS mode must be PERMISSIVE or STRICT, not {opts.inbound_mtls!r}"
        )
    for port in opts.plaintext_ports:
        _check_port(port, "plaintext port")
    for ip, port in opts.api_servers:
        ipaddress.ip_address(ip)  # ValueError names the bad one
        _check_port(port, f"API server port of {ip}")
    names.spiffe_id(opts.trust_domain, opts.pod_namespace, opts.service_account)  # names a bad part


def _check_port(port: int, what: str) -> None:
    try:
        check_port(port)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


# --- building blocks ---------------------------------------------------------------------


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


def _tcp_proxy(stat_prefix: str, cluster: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            _TYPE: _T_TCP,
            "stat_prefix": stat_prefix,
            "cluster": cluster,
            "max_connect_attempts": TCP_CONNECT_ATTEMPTS,
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


def _outbound_listener(opts: BootstrapOptions) -> dict[str, Any]:
    chains: list[dict[str, Any]] = [
        # Other pods' probe, health and stats ports are never captured on their side, so they
        # must not get mTLS either (a meshed Prometheus scraping :15090, a peer's :15021).
        {
            "name": f"outbound-plain-{port}",
            "filter_chain_match": {"destination_port": port},
            "filters": [_tcp_proxy(f"outbound_plain_{port}", "passthrough")],
        }
        for port in _plain_ports(opts)
    ]
    chains += _api_server_chains(opts)
    chains += _mesh_chains(opts)
    return {
        "name": "outbound",
        "stat_prefix": "outbound",
        **_listen(opts, "127.0.0.1", opts.ports.outbound),
        "listener_filters": [
            _listener_filter("envoy.filters.listener.original_dst", _T_ORIG_DST),
            _listener_filter("envoy.filters.listener.http_inspector", _T_HTTP_INSPECTOR),
        ],
        "listener_filters_timeout": f"{opts.sniff_timeout_ms / 1000:g}s",
        "continue_on_listener_filters_timeout": True,
        "filter_chains": chains,
    }


def _plain_ports(opts: BootstrapOptions) -> list[int]:
    """The peers' never-captured ports, then the mesh's plaintext ports, each once."""
    ports: list[int] = []
    for port in (*opts.ports.never_captured_inbound(), *opts.plaintext_ports):
        if port not in ports:
            ports.append(port)
    return ports


def _api_server_chains(opts: BootstrapOptions) -> list[dict[str, Any]]:
    """Per API server port: its exact addresses (/32 or /128) as plain passthrough, then that
    port's copy of the mesh and passthrough chains for every other address (see the module
    docstring: a port-specific chain hides the port-less ones). A port that is plaintext for
    every address anyway needs nothing more."""
    plain = set(_plain_ports(opts))
    by_port: dict[int, list[str]] = {}
    for ip, port in opts.api_servers:
        addr = str(ipaddress.ip_address(ip))
        if port not in plain and addr not in by_port.setdefault(port, []):
            by_port[port].append(addr)
    chains: list[dict[str, Any]] = []
    for port, addrs in by_port.items():
        exact = [
            {"address_prefix": a, "prefix_len": ipaddress.ip_address(a).max_prefixlen}
            for a in addrs
        ]
        chains.append(
            {
                "name": f"outbound-apiserver-{port}",
                "filter_chain_match": {"destination_port": port, "prefix_ranges": exact},
                "filters": [_tcp_proxy("outbound_apiserver", "passthrough")],
            }
        )
        chains += _mesh_chains(opts, port)
    return chains


def _mesh_chains(opts: BootstrapOptions, port: int | None = None) -> list[dict[str, Any]]:
    """mTLS to the mesh CIDRs (HTTP or other TCP, told apart by the sniffed protocol), plain
    passthrough elsewhere; restricted to one destination port when ``port`` is given."""
    mesh = _cidr_ranges(opts.mesh_cidrs)
    only: dict[str, Any] = {} if port is None else {"destination_port": port}
    suffix = "" if port is None else f"-{port}"
    return [
        {
            # h2c (gRPC) and HTTP/1 go to different clusters only for the ALPN value they
            # announce; this side is a TCP proxy for both.
            "name": f"outbound-mesh-h2{suffix}",
            "filter_chain_match": {
                **only,
                "prefix_ranges": mesh,
                "application_protocols": _H2C_PROTOCOLS,
            },
            "filters": [_tcp_proxy("outbound_mesh_h2", "outbound_mesh_h2")],
        },
        {
            "name": f"outbound-mesh-http{suffix}",
            "filter_chain_match": {
                **only,
                "prefix_ranges": mesh,
                "application_protocols": _HTTP1_PROTOCOLS,
            },
            "filters": [_tcp_proxy("outbound_mesh_http", "outbound_mesh_http")],
        },
        {
            "name": f"outbound-mesh-tcp{suffix}",
            "filter_chain_match": {**only, "prefix_ranges": mesh},
            "filters": [_tcp_proxy("outbound_mesh_tcp", "outbound_mesh_tcp")],
        },
        {
            # Anything outside the mesh CIDRs: as if there were no proxy.
            "name": f"outbound-passthrough{suffix}",
            "filter_chain_match": only,
            "filters": [_tcp_proxy("outbound_passthrough", "passthrough")],
        },
    ]


def _inbound_listener(opts: BootstrapOptions) -> dict[str, Any]:
    def tls(alpn: list[str]) -> dict[str, Any]:
        return {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                _TYPE: _T_TLS_DOWN,
                "require_client_certificate": True,
                "common_tls_context": _common_tls(opts, alpn),
            },
        }

    # The mTLS chains carry no port match: they are the catch-all that keeps the listener from
    # ever having zero chains, whatever ports the app has (iptables decides what reaches us).
    def http(name: str, alpn: str, codec: Literal["HTTP1", "HTTP2"]) -> dict[str, Any]:
        return {
            "name": name,
            "filter_chain_match": {"transport_protocol": "tls", "application_protocols": [alpn]},
            "transport_socket": tls([alpn]),
            "filters": [
                _http_manager(
                    name.replace("-", "_"),
                    "inbound_app",
                    forward_client_cert="SANITIZE_SET",
                    codec=codec,
                )
            ],
        }

    chains: list[dict[str, Any]] = [
        http("inbound-mtls-http", ALPN_HTTP, "HTTP1"),
        http("inbound-mtls-h2", ALPN_H2, "HTTP2"),
        {
            "name": "inbound-mtls-tcp",
            "filter_chain_match": {"transport_protocol": "tls"},
            "transport_socket": tls([]),
            "filters": [_tcp_proxy("inbound_mtls_tcp", "inbound_app")],
        },
    ]
    listener_filters = [
        _listener_filter("envoy.filters.listener.original_dst", _T_ORIG_DST),
        _listener_filter("envoy.filters.listener.tls_inspector", _T_TLS_INSPECTOR),
    ]
    if opts.inbound_mtls == "PERMISSIVE":
        listener_filters.append(
            _listener_filter("envoy.filters.listener.http_inspector", _T_HTTP_INSPECTOR)
        )
        chains += [
            {
                "name": "inbound-plain-http",
                "filter_chain_match": {
                    "transport_protocol": "raw_buffer",
                    "application_protocols": _HTTP_PROTOCOLS,
                },
                # A plaintext caller has no verified identity: strip any header claiming one.
                "filters": [
                    _http_manager(
                        "inbound_plain_http", "inbound_app", forward_client_cert="SANITIZE"
                    )
                ],
            },
            {
                "name": "inbound-plain-tcp",
                "filter_chain_match": {"transport_protocol": "raw_buffer"},
                "filters": [_tcp_proxy("inbound_plain_tcp", "inbound_app")],
            },
        ]
    # STRICT: plaintext matches no chain and the connection is closed (no_filter_chain_match).
    return {
        "name": "inbound",
        "stat_prefix": "inbound",
        **_listen(opts, "0.0.0.0", opts.ports.inbound),
        "listener_filters": listener_filters,
        "listener_filters_timeout": f"{opts.sniff_timeout_ms / 1000:g}s",
        "continue_on_listener_filters_timeout": True,
        "filter_chains": chains,
    }


def _admin_route_listener(
    opts: BootstrapOptions, name: str, port: int, path: str, rewrite: str
) -> dict[str, Any]:
    routes: list[dict[str, Any]] = [
        {
            "match": {"path": path},
            "route": {"cluster": "admin", "prefix_rewrite": rewrite, "timeout": "5s"},
        },
        {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
    ]
    hcm = _http_manager(name, "admin", forward_client_cert="SANITIZE", routes=routes)
    return {
        "name": name,
        # [::] too on an IPv6 pod: an IPv6-first cluster's kubelet probes the pod's IPv6 address
        **_listen(opts, "0.0.0.0", port),
        "filter_chains": [{"filters": [hcm]}],
    }


def _health_listener(opts: BootstrapOptions) -> dict[str, Any]:
    # Envoy's admin /ready answers 200 only in state LIVE: every listener initialised, which
    # includes the SDS certificate they wait for. While draining it answers 503.
    port = opts.ports.health
    return _admin_route_listener(opts, "health", port, names.HEALTH_PATH, "/ready")


def _stats_listener(opts: BootstrapOptions) -> dict[str, Any]:
    port = opts.ports.stats
    return _admin_route_listener(opts, "stats", port, names.STATS_PATH, names.STATS_PATH)


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
