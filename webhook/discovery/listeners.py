"""One sidecar's listeners: the outbound listener by original destination and the inbound one.

Pure. Built with the static bootstrap's own builders (:mod:`webhook.dataplane.bootstrap`), so
the inbound side, STRICT/PERMISSIVE, the health of the hop to the app and the TLS settings are
the same in both modes.

* the outbound listener (15001), by original destination: every ClusterIP:port of a known
  Service goes to that Service's cluster (HTTP through an HTTP connection manager and the
  port's routes, request by request; anything else relayed as TCP); a meshed pod's IP (any
  port captured on its side) goes to the ``outbound_mesh_*`` clusters (mTLS to whatever pod
  is there); the peers' never-captured ports and the mesh's ``plaintext_ports`` stay
  plaintext; anything else, an unknown destination, is passed through as it is — which also
  keeps the Kubernetes API server (no sidecar, so never a meshed pod IP) plaintext. Protocol
  sniffing is off for the destination ports a Service declares TCP, so a server-first
  protocol waits for nothing;
* the inbound listener (15006) of the bootstrap, plus per declared-TCP port of this pod a
  chain that skips sniffing (plaintext in PERMISSIVE, mTLS without inspection in STRICT).

Envoy prunes filter chains by destination port first (see the bootstrap): a chain naming a
port hides the port-less ones for every address on that port, so each port that has a
Service chain gets its own copy of the meshed-pod and passthrough chains.

Telemetry instruments both listeners and access policy is added to the inbound one last.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from webhook.config import DEFAULTS, TelemetryConfig
from webhook.dataplane import bootstrap as bs
from webhook.discovery import l7
from webhook.discovery.learn import learn_chain
from webhook.discovery.model import MeshModel, PodInfo, Service, ServicePort
from webhook.policy.envoy import with_authz
from webhook.routing.envoy import FAULT_FILTER
from webhook.telemetry import instrument as tm
from webhook.telemetry.settings import ProxyFacts
from webhook.telemetry.workload import workload_name

__all__ = [
    "build_listeners",
    "proxy_facts",
    "scoped_meshed_pods",
]

_SET_FILTER_STATE = (
    "type.googleapis.com/envoy.extensions.filters.network.set_filter_state.v3.Config"
)


def _ranges(ips: Iterable[str]) -> list[dict[str, Any]]:
    out = []
    for ip in sorted(set(ips), key=lambda a: (":" in a, ipaddress.ip_address(a))):
        bits = ipaddress.ip_address(ip).max_prefixlen
        out.append({"address_prefix": ip, "prefix_len": bits})
    return out


def _alpn_state(alpn: str) -> dict[str, Any]:
    """Set the upstream ALPN for this connection (what the peer's inbound side matches on)."""
    return {
        "name": "envoy.filters.network.set_filter_state",
        "typed_config": {
            bs._TYPE: _SET_FILTER_STATE,
            "on_new_connection": [
                {
                    "object_key": "envoy.network.application_protocols",
                    "format_string": {"text_format_source": {"inline_string": alpn}},
                }
            ],
        },
    }


def _service_chains(svc: Service, port: ServicePort) -> list[dict[str, Any]]:
    """A declared-TCP port: one chain. HTTP (declared or sniffed): the app's first bytes pick
    the ALPN the peer's inbound side needs — h2c (gRPC) and HTTP/1 get different codecs there —
    and an HTTP connection manager with the port's routes (:mod:`webhook.discovery.l7`);
    anything else is TCP. Sniffing costs nothing here: HTTP clients speak first."""
    cluster = svc.cluster_name(port)
    match: dict[str, Any] = {
        "destination_port": port.port,
        "prefix_ranges": _ranges(svc.cluster_ips),
    }
    tcp = {
        "name": cluster,
        "filter_chain_match": match,
        "filters": [bs._tcp_proxy(cluster, cluster)],
    }
    if port.protocol == "tcp":
        return [tcp]
    chains: list[dict[str, Any]] = [
        {
            "name": f"{cluster}|{suffix}",
            "filter_chain_match": {**match, "application_protocols": protocols},
            "filters": [
                _alpn_state(alpn),
                # The fault filter injects nothing until a route's TrafficPolicy says so.
                l7.outbound_http_manager(cluster, cluster, [FAULT_FILTER]),
            ],
        }
        for suffix, protocols, alpn in (
            ("h2c", list(bs._H2C_PROTOCOLS), str(bs.ALPN_H2)),
            ("http", list(bs._HTTP1_PROTOCOLS), str(bs.ALPN_HTTP)),
        )
    ]
    tcp["filters"] = [_alpn_state(bs.ALPN_TCP), *tcp["filters"]]
    return [*chains, tcp]


def _pod_chains(meshed: Mapping[str, frozenset[int]], port: int | None) -> list[dict[str, Any]]:
    """Meshed pod IPs → mTLS (HTTP or TCP by sniffing), their plaintext ports → passthrough,
    anything else → passthrough; for one destination port, or port-less when ``port`` is None."""
    only: dict[str, Any] = {} if port is None else {"destination_port": port}
    suffix = "" if port is None else f"-{port}"
    mtls = [ip for ip, plain in meshed.items() if port is None or port not in plain]
    chains: list[dict[str, Any]] = []
    if port is not None:
        plain = [ip for ip, p in meshed.items() if port in p]
        if plain:
            chains.append(
                {
                    "name": f"outbound-pod-plain{suffix}",
                    "filter_chain_match": {**only, "prefix_ranges": _ranges(plain)},
                    "filters": [bs._tcp_proxy("outbound_passthrough", "passthrough")],
                }
            )
    if mtls:
        ranges = _ranges(mtls)
        chains += [
            {
                "name": f"outbound-mesh-h2{suffix}",
                "filter_chain_match": {
                    **only,
                    "prefix_ranges": ranges,
                    "application_protocols": bs._H2C_PROTOCOLS,
                },
                "filters": [bs._tcp_proxy("outbound_mesh_h2", "outbound_mesh_h2")],
            },
            {
                "name": f"outbound-mesh-http{suffix}",
                "filter_chain_match": {
                    **only,
                    "prefix_ranges": ranges,
                    "application_protocols": bs._HTTP1_PROTOCOLS,
                },
                "filters": [bs._tcp_proxy("outbound_mesh_http", "outbound_mesh_http")],
            },
            {
                "name": f"outbound-mesh-tcp{suffix}",
                "filter_chain_match": {**only, "prefix_ranges": ranges},
                "filters": [bs._tcp_proxy("outbound_mesh_tcp", "outbound_mesh_tcp")],
            },
        ]
    chains.append(
        {
            "name": f"outbound-passthrough{suffix}",
            "filter_chain_match": only,
            "filters": [bs._tcp_proxy("outbound_passthrough", "passthrough")],
        }
    )
    return chains


def _port_ranges(ports: Iterable[int]) -> dict[str, Any]:
    """A listener filter predicate: the destination port is one of ``ports``."""
    rules = [{"destination_port_range": {"start": p, "end": p + 1}} for p in sorted(set(ports))]
    if len(rules) == 1:
        return rules[0]
    return {"or_match": {"rules": rules}}


def _outbound_listener(
    model: MeshModel,
    opts: bs.BootstrapOptions,
    services: Iterable[Service],
    meshed: Mapping[str, frozenset[int]],
    learn: Sequence[Service] = (),
) -> dict[str, Any]:
    listener = bs._outbound_listener(opts)
    plain = set(bs._plain_ports(opts))
    chains = [c for c in listener["filter_chains"] if c["name"].startswith("outbound-plain-")]
    service_ports: set[int] = set()
    no_sniff: set[int] = set(plain)
    for svc in services:
        if not svc.cluster_ips:
            continue  # headless: its endpoints are reached by pod IP
        for port in svc.ports:
            if port.port in plain:
                continue
            chains += _service_chains(svc, port)
            service_ports.add(port.port)
            if port.protocol == "tcp":
                no_sniff.add(port.port)
    pod_plain = {p for ports in meshed.values() for p in ports} - plain
    for dest_port in sorted(service_ports | pod_plain):
        chains += _pod_chains(meshed, dest_port)
        if (chain := learn_chain(learn, dest_port)) is not None:
            chains.append(chain)
    if (chain := learn_chain(learn, None)) is not None:
        chains.append(chain)
    chains += _pod_chains(meshed, None)
    for f in listener["listener_filters"]:
        if f["name"] == "envoy.filters.listener.http_inspector" and no_sniff:
            f["filter_disabled"] = _port_ranges(no_sniff)
    listener["filter_chains"] = chains
    return listener


def _inbound_listener(model: MeshModel, opts: bs.BootstrapOptions, pod: PodInfo) -> dict[str, Any]:
    listener = bs._inbound_listener(opts)
    declared = model.server_first.get((pod.namespace, pod.name), frozenset())
    if not declared:
        return listener
    for f in listener["listener_filters"]:
        if f["name"] != "envoy.filters.listener.original_dst":
            f["filter_disabled"] = _port_ranges(declared)
    extra = []
    for port in sorted(declared):
        chain: dict[str, Any] = {
            "name": f"inbound-declared-tcp-{port}",
            "filter_chain_match": {"destination_port": port},
            "filters": [bs._tcp_proxy("inbound_declared_tcp", "inbound_app")],
        }
        if opts.inbound_mtls == "STRICT":
            chain["transport_socket"] = {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    bs._TYPE: bs._T_TLS_DOWN,
                    "require_client_certificate": True,
                    "common_tls_context": bs._common_tls(opts, []),
                },
            }
        extra.append(chain)
    listener["filter_chains"] = extra + listener["filter_chains"]
    return listener


def scoped_meshed_pods(
    model: MeshModel, pod: PodInfo, services: Iterable[Service]
) -> dict[str, frozenset[int]]:
    """The meshed pod IPs a scoped sidecar knows: its namespace's and its Services' endpoints
    (others it reaches by pod IP go through as passthrough)."""
    all_meshed = model.meshed_pod_ports()
    ips = {ip for p in model.pods.values() if p.namespace == pod.namespace for ip in p.ips}
    for svc in services:
        for port in svc.ports:
            ips.update(e.ip for e in model.endpoints_of(svc, port))
    return {ip: all_meshed[ip] for ip in sorted(ips) if ip in all_meshed}


def build_listeners(
    model: MeshModel,
    opts: bs.BootstrapOptions,
    pod: PodInfo,
    services: Iterable[Service],
    meshed: Mapping[str, frozenset[int]] | None = None,
    learn: Sequence[Service] = (),
    telemetry: TelemetryConfig = DEFAULTS.telemetry,
) -> dict[str, dict[str, Any]]:
    """``meshed``: the meshed pod IPs to program (default: all of the mesh); ``learn``: the
    Services outside a scoped sidecar's scope, whose ClusterIPs it learns on demand."""
    services = list(services)
    known = model.meshed_pod_ports() if meshed is None else meshed
    inbound = _inbound_listener(model, opts, pod)
    out = [_outbound_listener(model, opts, services, known, learn), inbound]
    listeners = {listener["name"]: listener for listener in out}
    ns_settings = model.namespace_telemetry.get(pod.namespace)
    access_log = proxy_facts(pod, opts, telemetry, ns_settings).access_log
    pods = {ip: (workload_name(p.name, p.labels), p.namespace) for ip, p in _pods(model, known)}
    tm.instrument_listeners(listeners, access_log, telemetry=telemetry, pods=pods)
    # Access policy last: its filters go before each chain's proxy, its denial logs after the
    # telemetry loggers.
    listeners[inbound["name"]] = with_authz(listeners[inbound["name"]])
    return listeners


def _pods(model: MeshModel, ips: Iterable[str]) -> Iterable[tuple[str, PodInfo]]:
    for ip in ips:
        pod = model.by_ip.get(ip)
        if pod is not None:
            yield ip, pod


def proxy_facts(
    pod: PodInfo,
    opts: bs.BootstrapOptions,
    telemetry: TelemetryConfig,
    namespace_settings: Mapping[str, str] | None = None,
) -> ProxyFacts:
    """Who ``pod``'s sidecar is in its metrics and logs. Only its access-log policy goes into
    the listeners (and the listener cache's key): the sidecar names itself from its
    environment."""
    return ProxyFacts.of(
        workload=workload_name(pod.name, pod.labels),
        namespace=pod.namespace,
        principal=opts.spiffe_id,
        annotations=pod.telemetry,
        default_access_log=telemetry.access_log,
        namespace_annotations=namespace_settings,
    )
