"""Add telemetry to a sidecar's compiled listeners: one pass over their filter chains.

Called by the control plane's compiler on the listeners it built; it works on whatever the
chains hold (TCP proxies, HTTP connection managers with inline routes or RDS), so it does not
care how routing builds them. Per chain it knows which side of the hop it is on and fills each
identity label from the most trustworthy source that side has:

=========================  ===========================  ====================================
label                      client's sidecar (outbound,  server's sidecar (inbound,
                           ``reporter=source``)         ``reporter=destination``)
=========================  ===========================  ====================================
source_workload            itself (its environment)     the caller's sidecar's claim (SNI)
source_namespace           itself                       the caller's sidecar's claim (SNI)
source_principal           itself                       the caller's verified certificate
destination_workload       endpoint metadata            itself
destination_namespace      the chain's Service          itself
destination_principal      the server's verified cert   itself
destination_service        the chain's Service          the caller's sidecar's claim (SNI)
connection_security_policy endpoint metadata           the chain (TLS or not)
                           (``tlsMode``) / chain
=========================  ===========================  ====================================

The claim: every outbound chain toward a meshed destination sets the TLS server name (SNI) to
``<own workload>.<own namespace>[.<Service host>]`` (``set_filter_state``); the server's
sidecar splits it once per connection (CEL ``re.extract`` into filter state, read by the
labels). It is only as honest as the calling sidecar, which is why the principal comes from
the certificate (and it names the namespace too); a plaintext caller has no claim and no
certificate: ``unknown``.

What a sidecar says about itself comes from Envoy's environment (``%ENVIRONMENT(…)%``, see
:mod:`webhook.telemetry.workload`), never from a literal: the listeners are the same for every
workload with the same access-log policy, so the control plane builds them once for all.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from webhook.config import TelemetryConfig
from webhook.telemetry.accesslog import json_logger
from webhook.telemetry.metrics import stats_logger
from webhook.telemetry.settings import AccessLogPolicy
from webhook.telemetry.tracing import http_tracing
from webhook.telemetry.workload import OWN_NAMESPACE, OWN_PRINCIPAL, OWN_WORKLOAD, UNKNOWN

__all__ = [
    "ENDPOINT_METADATA",
    "MUTUAL_TLS",
    "PLAINTEXT",
    "POD_DIRECTORY",
    "endpoint_metadata",
    "instrument_listeners",
]

_TYPE = "@type"
_TCP_PROXY = "envoy.filters.network.tcp_proxy"
_HCM = "envoy.filters.network.http_connection_manager"
_SET_FILTER_STATE = (
    "type.googleapis.com/envoy.extensions.filters.network.set_filter_state.v3.Config"
)
#: The endpoint metadata namespace the control plane fills (see :func:`endpoint_metadata`): the
#: one Envoy's transport socket matcher reads. The telemetry keys share it because every
#: metadata namespace and key an endpoint carries costs each sidecar work on every update of
#: the endpoints of that Service.
ENDPOINT_METADATA: Final = "envoy.transport_socket_match"
#: ``tlsMode`` of a meshed endpoint and of any other; also the ``connection_security_policy``
#: values.
MUTUAL_TLS: Final = "mutual_tls"
PLAINTEXT: Final = "none"

_SNI = "connection.requested_server_name"
#: The caller's claim, ``<workload>.<namespace>[.<service host>]``, split once per connection
#: (CEL's regex is far too costly to run for every label of every request).
_CLAIM: Final = {
    "sidemesh.peer.workload": "^([^.]*)",
    "sidemesh.peer.namespace": "^[^.]*[.]([^.]*)",
    "sidemesh.peer.service": "^[^.]*[.][^.]*[.]?(.*)$",
}
_CERT_NAMESPACE: Final = (
    '%CEL(re.extract(connection.uri_san_peer_certificate, "^spiffe://[^/]*/ns/([^/]*)/", "\\\\1"))%'
)
_INBOUND_MTLS: Final = {
    "source_workload": "%FILTER_STATE(sidemesh.peer.workload:PLAIN)%",
    "source_namespace": "%FILTER_STATE(sidemesh.peer.namespace:PLAIN)%",
    "source_principal": "%DOWNSTREAM_PEER_URI_SAN%",
    "destination_service": "%FILTER_STATE(sidemesh.peer.service:PLAIN)%",
    "connection_security_policy": "mutual_tls",
}
_INBOUND_PLAIN: Final = {
    "source_workload": UNKNOWN,
    "source_namespace": UNKNOWN,
    "source_principal": UNKNOWN,
    "destination_service": UNKNOWN,
    "connection_security_policy": "none",
}
#: Inbound chains of declared server-first ports: TLS without the inspector that reads SNI.
_NOT_INSPECTED: Final = "inbound-declared-tcp-"
#: Chains that carry no app traffic worth counting: other pods' probe, health and stats ports,
#: DNS, the API server.
_SKIPPED_PREFIXES: Final = ("outbound-plain-", "outbound-apiserver-")
#: Outbound listener metadata: each meshed pod IP the sidecar knows → its workload and
#: namespace, for calls made to a pod IP (no Service, so no endpoint metadata).
POD_DIRECTORY: Final = "sidemesh.io/pods"
_DEST_IP: Final = 're.extract(destination.address, "^\\\\[?([^\\\\]]+?)\\\\]?:[0-9]+$", "\\\\1")'
#: Where a pod-IP call's destination labels are kept, looked up once per connection.
_POD_LOOKUP: Final = {
    f"sidemesh.dest.{key}": (
        f'%CEL(xds.listener_metadata.filter_metadata["{POD_DIRECTORY}"][{_DEST_IP}].{key})%'
    )
    for key in ("workload", "namespace")
}
#: The claim's first two parts: this sidecar's workload and namespace.
_OWN_CLAIM: Final = f"{OWN_WORKLOAD}.{OWN_NAMESPACE}"


def endpoint_metadata(workload: str | None, mtls: bool) -> dict[str, str]:
    """What an endpoint tells its clients about itself: how to talk to it (``tlsMode``, what
    the cluster's transport socket matches look at) and, for their metrics, its workload (None:
    no pod). Its namespace is the Service's: the chain knows it."""
    return {"tlsMode": MUTUAL_TLS if mtls else PLAINTEXT, "workload": workload or UNKNOWN}


def instrument_listeners(
    listeners: Mapping[str, dict[str, Any]],
    access_log: AccessLogPolicy,
    *,
    telemetry: TelemetryConfig,
    pods: Mapping[str, tuple[str, str]] | None = None,
) -> None:
    """Add the loggers to every counted chain of ``listeners`` (modified in place: they are
    the compiler's fresh dicts). Nothing here depends on which workload the sidecar is but
    ``access_log``, its access-log policy. ``pods``: the meshed pod IPs the outbound listener
    leads to, with their workload and namespace (what a call to a pod IP is labelled with)."""
    if pods and "outbound" in listeners:
        directory = {ip: {"workload": w, "namespace": ns} for ip, (w, ns) in pods.items()}
        listeners["outbound"].setdefault("metadata", {}).setdefault("filter_metadata", {})[
            POD_DIRECTORY
        ] = directory
    for name, listener in listeners.items():
        if name not in ("inbound", "outbound"):
            continue
        # Spans of the outbound side are the client's (kind CLIENT, "egress").
        listener["traffic_direction"] = name.upper()
        for chain in listener.get("filter_chains", ()):
            if str(chain.get("name", "")).startswith(_SKIPPED_PREFIXES):
                continue
            labels, sni = _chain_identity(name, chain)
            if labels is None:
                continue
            if sni is not None:
                _send_sni(chain["filters"], sni)
            if labels.get("destination_workload") == _POD_WORKLOAD:
                _look_up_pod(chain["filters"])
            if labels.get("source_workload") == _INBOUND_MTLS["source_workload"]:
                chain["filters"] = [_read_claim(), *chain["filters"]]
            _add_loggers(chain["filters"], labels, access_log, telemetry)


def _add_loggers(
    filters: Iterable[dict[str, Any]],
    labels: dict[str, str],
    access_log: AccessLogPolicy,
    telemetry: TelemetryConfig,
) -> None:
    for f in filters:
        if f.get("name") == _TCP_PROXY:
            protocol = "tcp"
        elif f.get("name") == _HCM:
            protocol = "http"
        else:
            continue
        if protocol == "http":
            inbound = labels["reporter"] == "destination"
            http_tracing(telemetry, f["typed_config"], inbound=inbound)
        loggers = [stats_logger(protocol, labels)] if telemetry.metrics else []
        logged = json_logger(protocol, labels, access_log)
        if logged is not None:
            loggers.append(logged)
        if loggers:
            config = f["typed_config"]
            config["access_log"] = [*config.get("access_log", []), *loggers]


def _chain_identity(
    side: str, chain: Mapping[str, Any]
) -> tuple[dict[str, str] | None, str | None]:
    """The chain's identity labels (None: not counted) and the SNI claim to send (None: none)."""
    if side == "inbound":
        own = {
            "reporter": "destination",
            "destination_workload": OWN_WORKLOAD,
            "destination_namespace": OWN_NAMESPACE,
            "destination_principal": OWN_PRINCIPAL,
        }
        peer = _INBOUND_MTLS if "transport_socket" in chain else _INBOUND_PLAIN
        if str(chain.get("name", "")).startswith(_NOT_INSPECTED):
            # Nothing waits for a server-first protocol's client, so no TLS inspector reads
            # the SNI claim: only the certificate's facts are known.
            # The certificate names the namespace (CEL, once per connection: it is TCP).
            peer = {
                **peer,
                "source_workload": UNKNOWN,
                "source_namespace": _CERT_NAMESPACE,
                "destination_service": UNKNOWN,
            }
        return {**own, **peer}, None
    cluster = _upstream_cluster(chain)
    if cluster is None:
        return None, None
    own = {
        "reporter": "source",
        "source_workload": OWN_WORKLOAD,
        "source_namespace": OWN_NAMESPACE,
        "source_principal": OWN_PRINCIPAL,
        "destination_principal": "%UPSTREAM_PEER_URI_SAN%",
    }
    if cluster.startswith("outbound|"):
        host = cluster.split("|")[-1]  # <service>.<namespace>.svc.<domain>
        meta = f"%METADATA(UPSTREAM_HOST:{ENDPOINT_METADATA}:{{}})%"
        dest = {
            "destination_workload": meta.format("workload"),
            "destination_namespace": host.split(".")[1],
            "destination_service": host,
            "connection_security_policy": meta.format("tlsMode"),
        }
        return {**own, **dest}, f"{_OWN_CLAIM}.{host}"
    meshed = cluster.startswith("outbound_mesh")
    dest = {
        # A meshed pod IP: looked up in the listener's pod directory, once per connection.
        "destination_workload": _POD_WORKLOAD if meshed else UNKNOWN,
        "destination_namespace": _POD_NAMESPACE if meshed else UNKNOWN,
        "destination_service": UNKNOWN if meshed else "passthrough",
        "connection_security_policy": "mutual_tls" if meshed else "none",
    }
    return {**own, **dest}, _OWN_CLAIM if meshed else None


_POD_WORKLOAD: Final = "%FILTER_STATE(sidemesh.dest.workload:PLAIN)%"
_POD_NAMESPACE: Final = "%FILTER_STATE(sidemesh.dest.namespace:PLAIN)%"


def _look_up_pod(filters: list[dict[str, Any]]) -> None:
    """Fill a pod-IP chain's destination workload and namespace into filter state, once per
    connection, from the listener's pod directory."""
    entries = [
        {
            "object_key": key,
            "factory_key": "envoy.string",
            "format_string": {"text_format_source": {"inline_string": value}},
        }
        for key, value in _POD_LOOKUP.items()
    ]
    for f in filters:
        if f.get("typed_config", {}).get(_TYPE) == _SET_FILTER_STATE:
            f["typed_config"]["on_new_connection"].extend(entries)
            return
    state = {
        "name": "envoy.filters.network.set_filter_state",
        "typed_config": {_TYPE: _SET_FILTER_STATE, "on_new_connection": entries},
    }
    filters.insert(len(filters) - 1, state)


def _upstream_cluster(chain: Mapping[str, Any]) -> str | None:
    """The cluster (or, with RDS, the route config named after it) a chain leads to."""
    for f in chain.get("filters", ()):
        config = f.get("typed_config", {})
        if f.get("name") == _TCP_PROXY:
            return str(config.get("cluster", "")) or None
        if f.get("name") == _HCM:
            if "rds" in config:
                return str(config["rds"].get("route_config_name", "")) or None
            for vhost in config.get("route_config", {}).get("virtual_hosts", ()):
                for route in vhost.get("routes", ()):
                    if "cluster" in route.get("route", {}):
                        return str(route["route"]["cluster"])
    return None


def _read_claim() -> dict[str, Any]:
    """Split the caller's SNI claim into filter state, once per connection (the labels read
    it with ``%FILTER_STATE(…:PLAIN)%``)."""
    return {
        "name": "envoy.filters.network.set_filter_state",
        "typed_config": {
            _TYPE: _SET_FILTER_STATE,
            "on_new_connection": [
                {
                    "object_key": key,
                    "factory_key": "envoy.string",
                    "format_string": {
                        "text_format_source": {
                            "inline_string": f'%CEL(re.extract({_SNI}, "{regex}", "\\\\1"))%'
                        }
                    },
                }
                for key, regex in _CLAIM.items()
            ],
        },
    }


def _send_sni(filters: list[dict[str, Any]], server_name: str) -> None:
    """Send ``server_name`` as the upstream TLS SNI of this chain's connections: one more
    entry of the chain's ``set_filter_state`` filter, or a new one before the proxy filter."""
    entry = {
        "object_key": "envoy.network.upstream_server_name",
        "format_string": {"text_format_source": {"inline_string": server_name}},
    }
    for f in filters:
        if f.get("typed_config", {}).get(_TYPE) == _SET_FILTER_STATE:
            f["typed_config"]["on_new_connection"].append(entry)
            return
    state = {
        "name": "envoy.filters.network.set_filter_state",
        "typed_config": {_TYPE: _SET_FILTER_STATE, "on_new_connection": [entry]},
    }
    filters.insert(len(filters) - 1, state)
