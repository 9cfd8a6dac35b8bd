"""The sidecar's two capture listeners: outbound (15001) and inbound (15006). Pure.

The static bootstrap uses them as they are; the control plane's compiler starts from them and
adds what discovery knows (Services, meshed pods, declared-TCP ports).

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
from typing import Any, Literal

from webhook.dataplane.parts import (
    _H2C_PROTOCOLS,
    _HTTP1_PROTOCOLS,
    _HTTP_PROTOCOLS,
    _T_HTTP_INSPECTOR,
    _T_ORIG_DST,
    _T_TLS_DOWN,
    _T_TLS_INSPECTOR,
    _TYPE,
    ALPN_H2,
    ALPN_HTTP,
    BootstrapOptions,
    _cidr_ranges,
    _common_tls,
    _http_manager,
    _listen,
    _listener_filter,
    _tcp_proxy,
)


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


def _inbound_tls(opts: BootstrapOptions, alpn: list[str]) -> dict[str, Any]:
    """The inbound mTLS socket: a client certificate from the mesh is required."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            _TYPE: _T_TLS_DOWN,
            "require_client_certificate": True,
            "common_tls_context": _common_tls(opts, alpn),
        },
    }


def _inbound_mtls_chains(opts: BootstrapOptions) -> list[dict[str, Any]]:
    """HTTP/1, h2 (by the ALPN the caller's sidecar announced) and other TCP, over mTLS. They
    carry no port match: they are the catch-all that keeps the listener from ever having zero
    chains, whatever ports the app has (iptables decides what reaches us)."""

    def http(name: str, alpn: str, codec: Literal["HTTP1", "HTTP2"]) -> dict[str, Any]:
        manager = _http_manager(
            name.replace("-", "_"), "inbound_app", forward_client_cert="SANITIZE_SET", codec=codec
        )
        return {
            "name": name,
            "filter_chain_match": {"transport_protocol": "tls", "application_protocols": [alpn]},
            "transport_socket": _inbound_tls(opts, [alpn]),
            "filters": [manager],
        }

    return [
        http("inbound-mtls-http", ALPN_HTTP, "HTTP1"),
        http("inbound-mtls-h2", ALPN_H2, "HTTP2"),
        {
            "name": "inbound-mtls-tcp",
            "filter_chain_match": {"transport_protocol": "tls"},
            "transport_socket": _inbound_tls(opts, []),
            "filters": [_tcp_proxy("inbound_mtls_tcp", "inbound_app")],
        },
    ]


def _inbound_plain_chains() -> list[dict[str, Any]]:
    """PERMISSIVE only: plaintext HTTP (a caller without identity: any header claiming one is
    stripped) and other plaintext TCP."""
    return [
        {
            "name": "inbound-plain-http",
            "filter_chain_match": {
                "transport_protocol": "raw_buffer",
                "application_protocols": _HTTP_PROTOCOLS,
            },
            "filters": [
                _http_manager("inbound_plain_http", "inbound_app", forward_client_cert="SANITIZE")
            ],
        },
        {
            "name": "inbound-plain-tcp",
            "filter_chain_match": {"transport_protocol": "raw_buffer"},
            "filters": [_tcp_proxy("inbound_plain_tcp", "inbound_app")],
        },
    ]


def _inbound_listener(opts: BootstrapOptions) -> dict[str, Any]:
    chains = _inbound_mtls_chains(opts)
    listener_filters = [
        _listener_filter("envoy.filters.listener.original_dst", _T_ORIG_DST),
        _listener_filter("envoy.filters.listener.tls_inspector", _T_TLS_INSPECTOR),
    ]
    if opts.inbound_mtls == "PERMISSIVE":
        listener_filters.append(
            _listener_filter("envoy.filters.listener.http_inspector", _T_HTTP_INSPECTOR)
        )
        chains += _inbound_plain_chains()
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
