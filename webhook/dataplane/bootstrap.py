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
"""

from __future__ import annotations

import ipaddress
from typing import Any, Literal

from webhook import names
from webhook.config import INBOUND_MTLS_MODES

# The building blocks and the capture listeners live in their own modules; they are
# re-exported here because the control plane's compiler builds from the same pieces.
from webhook.dataplane.listeners import (
    _inbound_listener as _inbound_listener,
    _outbound_listener as _outbound_listener,
    _plain_ports as _plain_ports,
)
from webhook.dataplane.parts import (
    _H2C_PROTOCOLS as _H2C_PROTOCOLS,
    _HTTP1_PROTOCOLS as _HTTP1_PROTOCOLS,
    _HTTP_PROTOCOLS as _HTTP_PROTOCOLS,
    _T_HTTP_OPTIONS as _T_HTTP_OPTIONS,
    _T_MAX_CX as _T_MAX_CX,
    _T_SECRET as _T_SECRET,
    _T_TLS_DOWN as _T_TLS_DOWN,
    _T_TLS_UP as _T_TLS_UP,
    _TYPE as _TYPE,
    ALPN_H2 as ALPN_H2,
    ALPN_HTTP as ALPN_HTTP,
    ALPN_TCP as ALPN_TCP,
    CERT_FILE as CERT_FILE,
    CERT_SECRET as CERT_SECRET,
    KEY_FILE as KEY_FILE,
    MAX_DOWNSTREAM_CONNECTIONS as MAX_DOWNSTREAM_CONNECTIONS,
    ROOT_FILE as ROOT_FILE,
    ROOT_SECRET as ROOT_SECRET,
    TCP_CONNECT_ATTEMPTS as TCP_CONNECT_ATTEMPTS,
    BootstrapOptions as BootstrapOptions,
    _addr as _addr,
    _circuit_breakers as _circuit_breakers,
    _common_tls as _common_tls,
    _http_manager as _http_manager,
    _inbound_app_cluster as _inbound_app_cluster,
    _listen as _listen,
    _mesh_cluster as _mesh_cluster,
    _original_dst_cluster as _original_dst_cluster,
    _tcp_proxy as _tcp_proxy,
    sds_dir as sds_dir,
)
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


def local_address_ip_version(opts: BootstrapOptions) -> Literal["v4", "v6"]:
    """Envoy's ``--local-address-ip-version``: the family of the address Envoy reports as its
    own (e.g. in ``x-forwarded-for``). IPv4 whenever the pod has it, IPv6 for an IPv6-only pod."""
    return "v4" if opts.ipv4 or not opts.ipv6 else "v6"


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
                stats_listener(opts),
            ],
            "clusters": [
                _mesh_cluster("outbound_mesh_http", opts, ALPN_HTTP),
                _mesh_cluster("outbound_mesh_h2", opts, ALPN_H2),
                _mesh_cluster("outbound_mesh_tcp", opts, ALPN_TCP),
                _original_dst_cluster("passthrough"),
                _inbound_app_cluster(opts),
                local_cluster("admin", ports.admin),
            ],
        },
    }


def local_cluster(name: str, port: int) -> dict[str, Any]:
    """A cluster of one port on the pod's loopback (Envoy's admin, the agent)."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _addr("127.0.0.1", port)}}]}],
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


def _admin_route_listener(
    opts: BootstrapOptions, name: str, port: int, path: str, rewrite: str, cluster: str = "admin"
) -> dict[str, Any]:
    routes: list[dict[str, Any]] = [
        {
            "match": {"path": path},
            "route": {"cluster": cluster, "prefix_rewrite": rewrite, "timeout": "5s"},
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


def stats_listener(opts: BootstrapOptions, cluster: str = "admin") -> dict[str, Any]:
    """``/stats/prometheus`` on the stats port, answered by ``cluster`` (Envoy's admin)."""
    port = opts.ports.stats
    path = names.STATS_PATH
    return _admin_route_listener(opts, "stats", port, path, path, cluster)
