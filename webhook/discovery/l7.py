"""The HTTP side of a Service port on the client's sidecar: an HTTP connection manager whose
routes come over RDS, and the default RouteConfiguration every HTTP-capable port gets.

Pure. Why the client side terminates HTTP at all (the static bootstrap only relays bytes): a
route is where a request is balanced across replicas one by one (not one connection at a
time), retried, split by weight, timed out, faulted, and where telemetry sees a request. The
server's inbound side keeps its own HCM per ALPN; the two agree on the protocol in ALPN as
before (``sidemesh-http`` / ``sidemesh-h2``): the chain's ``set_filter_state`` names it for
the upstream connection, and the cluster speaks to the peer in the protocol the app spoke
(``use_downstream_protocol_config``), so HTTP/1 stays HTTP/1 and h2c (gRPC) stays HTTP/2.

A RouteConfiguration is named like the Service port's cluster
(``outbound|<port>||<svc>.<ns>.svc.cluster.local``): the names a sidecar may see are the
cluster names in its scope, for both types, and the HCM of that port's chain asks for it.
Traffic rules replace the default route list; they do not rename the configuration.
"""

from __future__ import annotations

from typing import Any, Final

from webhook.dataplane import bootstrap as bs
from webhook.discovery.model import Service, ServicePort

__all__ = [
    "DEFAULT_RETRY",
    "HTTP_OPTIONS_KEY",
    "default_route",
    "http_protocol_options",
    "is_http",
    "outbound_http_manager",
    "route_config",
]

HTTP_OPTIONS_KEY: Final = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

#: What every route retries unless a rule says otherwise: only failures where the request never
#: reached the app (the connection or the stream was refused, or reset before a byte of the
#: request was sent), so a retry can never run a request twice. On another replica: a pod that
#: is going away should not get the retry too. The static data plane's TCP relay retried a
#: refused connection the same way (``TCP_CONNECT_ATTEMPTS`` attempts in all).
DEFAULT_RETRY: Final[dict[str, Any]] = {
    "retry_on": "connect-failure,refused-stream,reset-before-request",
    "num_retries": bs.TCP_CONNECT_ATTEMPTS - 1,
    "retry_host_predicate": [
        {
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {
                bs._TYPE: "type.googleapis.com/envoy.extensions.retry.host."
                "previous_hosts.v3.PreviousHostsPredicate"
            },
        }
    ],
    "host_selection_retry_max_attempts": "3",
}


def is_http(port: ServicePort) -> bool:
    """HTTP-capable: declared HTTP, or sniffed (the app's first bytes decide per connection)."""
    return port.protocol != "tcp"


def http_protocol_options() -> dict[str, Any]:
    """A cluster option: speak to the peer in the protocol the app spoke to us."""
    return {
        HTTP_OPTIONS_KEY: {
            bs._TYPE: bs._T_HTTP_OPTIONS,
            "use_downstream_protocol_config": {
                "http_protocol_options": {},
                "http2_protocol_options": {},
            },
        }
    }


def outbound_http_manager(
    stat_prefix: str, route_name: str, filters: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The client-side HCM of one Service port's HTTP chain (routes by RDS)."""
    return bs._http_manager(
        stat_prefix,
        route_name,
        forward_client_cert="SANITIZE",
        route_config_name=route_name,
        filters=filters,
    )


def default_route(cluster: str) -> dict[str, Any]:
    """Every request to the Service port's cluster, with no time limit of our own (the app
    had none without the mesh: long polls and streams must live) and the safe retries."""
    return {
        "name": "default",
        "match": {"prefix": "/"},
        "route": {"cluster": cluster, "timeout": "0s", "retry_policy": DEFAULT_RETRY},
    }


def route_config(
    svc: Service, port: ServicePort, routes: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The RouteConfiguration of one Service port: ``routes``, else the default route."""
    name = svc.cluster_name(port)
    return {
        "name": name,
        "virtual_hosts": [
            {
                "name": f"{svc.host}:{port.port}",
                # The chain was picked by the Service's address; any Host the app sends is it.
                "domains": ["*"],
                "routes": routes if routes is not None else [default_route(name)],
            }
        ],
    }
