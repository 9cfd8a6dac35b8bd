"""Learning what a scoped sidecar calls, without the user declaring it. Pure.

A scoped sidecar knows only the Services of its own namespace and its declared dependencies.
The address blocks that hold other Services' ClusterIPs (each IPv4 /16 or IPv6 /112 with at
least one) get a *learn* chain on the outbound listener: it names the connection's original
destination as a cluster (``learn|<ip>:<port>``, through the ``envoy.tcp_proxy.cluster``
filter state) and its ``tcp_proxy`` asks the control plane for that cluster on demand (ODCDS,
on the same ADS stream). The control plane resolves the address to the Service port, answers
with an alias of the Service's own cluster (same endpoints by EDS, same per-endpoint mTLS) and
adds the Service to the sidecar's scope, so the next push gives the sidecar that Service's real
chain, cluster and routes. The first connection waits for one round trip to the control plane
and is relayed at L4; the ones after it take the real chain.

Blocks, not addresses: listing every ClusterIP would make each sidecar's listener (and Envoy's
memory) grow with the mesh. An address in a block that is no Service port is answered with a
passthrough cluster of that name, so whatever else lives there is reached as before.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any, Final

from webhook.dataplane import bootstrap as bs
from webhook.discovery.model import Service

__all__ = [
    "LEARN_PREFIX",
    "ON_DEMAND_TIMEOUT",
    "alias_cluster",
    "learn_blocks",
    "learn_chain",
    "parse_learn_name",
    "passthrough_cluster",
]

LEARN_PREFIX: Final = "learn|"
#: How long the first connection to an unseen Service waits for its cluster.
ON_DEMAND_TIMEOUT: Final = "5s"
_SET_FILTER_STATE: Final = (
    "type.googleapis.com/envoy.extensions.filters.network.set_filter_state.v3.Config"
)


def parse_learn_name(name: str) -> tuple[str, int] | None:
    """``learn|10.96.0.15:80`` → ``("10.96.0.15", 80)``; ``learn|[fd00::1]:80`` too."""
    if not name.startswith(LEARN_PREFIX):
        return None
    host, sep, port = name[len(LEARN_PREFIX) :].rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    return str(ip), int(port)


#: The block a ClusterIP is learned by, per IP version: as large as a /16 of IPv4.
_BLOCK_BITS: Final = {4: 16, 6: 112}


def learn_blocks(ips: Iterable[str]) -> list[tuple[str, int]]:
    """The address blocks that hold ``ips``: (network address, prefix length), sorted."""
    nets = {
        ipaddress.ip_network(f"{ip}/{_BLOCK_BITS[ipaddress.ip_address(ip).version]}", strict=False)
        for ip in ips
    }
    return sorted((str(n.network_address), n.prefixlen) for n in nets)


def learn_chain(services: Iterable[Service], port: int | None) -> dict[str, Any] | None:
    """The chain for the blocks of the ClusterIPs of ``services`` (those outside the sidecar's
    scope), for one destination port or port-less; None when there are none."""
    chosen = [s for s in services if port is None or any(p.port == port for p in s.ports)]
    blocks = learn_blocks(ip for svc in chosen for ip in svc.cluster_ips)
    if not blocks:
        return None
    match: dict[str, Any] = {
        "prefix_ranges": [{"address_prefix": ip, "prefix_len": bits} for ip, bits in blocks]
    }
    if port is not None:
        match = {"destination_port": port, **match}
    proxy = bs._tcp_proxy("outbound_learn", "passthrough")
    proxy["typed_config"]["on_demand"] = {
        "odcds_config": {"ads": {}, "resource_api_version": "V3"},
        "timeout": ON_DEMAND_TIMEOUT,
    }
    return {
        "name": "outbound-learn" if port is None else f"outbound-learn-{port}",
        "filter_chain_match": match,
        "filters": [
            {
                "name": "envoy.filters.network.set_filter_state",
                "typed_config": {
                    bs._TYPE: _SET_FILTER_STATE,
                    "on_new_connection": [
                        {
                            "object_key": "envoy.tcp_proxy.cluster",
                            "format_string": {
                                "text_format_source": {
                                    "inline_string": f"{LEARN_PREFIX}%DOWNSTREAM_LOCAL_ADDRESS%"
                                }
                            },
                        }
                    ],
                },
            },
            proxy,
        ],
    }


def passthrough_cluster(name: str) -> dict[str, Any]:
    """What an address in a learn block that is no Service port gets: its original destination."""
    return bs._original_dst_cluster(name)


def alias_cluster(name: str, real: Mapping[str, Any]) -> dict[str, Any]:
    """The Service's cluster under the on-demand name: the same EDS endpoints and sockets."""
    alias = dict(real)
    alias["name"] = name
    alias["eds_cluster_config"] = {
        **real["eds_cluster_config"],
        "service_name": real["eds_cluster_config"].get("service_name", real["name"]),
    }
    return alias
