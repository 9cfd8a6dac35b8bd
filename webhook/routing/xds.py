"""What the push engine asks of the routing table, per Service: its clusters (its own with the
TrafficPolicy applied, and one per subset), their endpoints, the routes of each port, and the
Services a sidecar in scope of it must also see (pure).

The discovery core calls these in a line or two each, so the rules stay in this package.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from webhook.dataplane.bootstrap import BootstrapOptions
from webhook.discovery.clusters import build_cluster, build_endpoints
from webhook.discovery.model import Endpoint, MeshModel, Service, ServicePort
from webhook.routing import envoy as ev
from webhook.routing.subsets import SubsetCluster, subset_endpoints
from webhook.routing.table import RoutingTable

__all__ = [
    "cluster_names",
    "extra_clusters",
    "port_routes",
    "problems_text",
    "route_inputs",
    "scope_services",
    "service_cluster",
    "subset_cluster",
    "subset_inputs",
]


def service_cluster(
    table: RoutingTable,
    svc: Service,
    port: ServicePort,
    eps: Iterable[Endpoint],
    opts: BootstrapOptions,
) -> dict[str, Any]:
    """The Service port's cluster with its TrafficPolicy's cluster settings."""
    return ev.apply_cluster_policy(build_cluster(svc, port, eps, opts), table.policy_for(svc))


def subset_inputs(
    table: RoutingTable, model: MeshModel, svc: Service
) -> list[tuple[SubsetCluster, tuple[Endpoint, ...]]]:
    """Each subset of ``svc`` with its endpoints: what its cluster and load assignment are
    built from (cheap to compare with the last build's)."""
    return [
        (sub, subset_endpoints(model, svc, sub.port, sub.labels)) for sub in table.subsets_of(svc)
    ]


def subset_cluster(
    table: RoutingTable,
    svc: Service,
    sub: SubsetCluster,
    eps: tuple[Endpoint, ...],
    opts: BootstrapOptions,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A subset's cluster (the Service port's, narrowed, with the policy) and endpoints."""
    cluster = build_cluster(svc, sub.port, eps, opts)
    cluster["name"] = sub.name
    cluster["eds_cluster_config"]["service_name"] = sub.name
    return ev.apply_cluster_policy(cluster, table.policy_for(svc)), build_endpoints(sub.name, eps)


def extra_clusters(
    table: RoutingTable, model: MeshModel, svc: Service, opts: BootstrapOptions
) -> dict[str, tuple[dict[str, Any], dict[str, Any], tuple[Endpoint, ...]]]:
    """The subset clusters of ``svc``: name → (cluster, load assignment, endpoints)."""
    out = {}
    for sub, eps in subset_inputs(table, model, svc):
        out[sub.name] = (*subset_cluster(table, svc, sub, eps, opts), eps)
    return out


def route_inputs(table: RoutingTable, svc: Service, port: ServicePort) -> Any:
    """What :func:`port_routes` of the port is built from (compare before building)."""
    return table.routes.get(svc.cluster_name(port)), table.policy_for(svc)


def port_routes(
    table: RoutingTable, svc: Service, port: ServicePort
) -> list[dict[str, Any]] | None:
    """The routes of the Service port's RouteConfiguration: its attached rules in precedence
    order, else one default route to its own cluster; both with its TrafficPolicy's retries,
    faults and hashing. None when no rule concerns the port (the mesh's default route)."""
    name = svc.cluster_name(port)
    policy = table.policy_for(svc)
    entries = table.routes.get(name)
    if not entries:
        return None if policy is None else [ev.default_route(name, policy)]
    return [ev.entry_route(e, policy) for e in entries]


def scope_services(
    table: RoutingTable, model: MeshModel, services: Iterable[Service]
) -> list[Service]:
    """``services`` plus every Service their routes send to (backends, mirrors): a sidecar
    that may call a Service must know where its rules send the requests."""
    out: dict[tuple[str, str], Service] = {(s.namespace, s.name): s for s in services}
    for key in list(out):
        for backend in sorted(table.backends.get(key, ())):
            svc = model.services.get(backend)
            if svc is not None:
                out.setdefault(backend, svc)
    return list(out.values())


def cluster_names(table: RoutingTable, services: Iterable[Service]) -> set[str]:
    """Every cluster (and so route configuration) name of ``services``, subsets included."""
    names: set[str] = set()
    for svc in services:
        names.update(svc.cluster_name(p) for p in svc.ports)
        names.update(s.name for s in table.subsets_of(svc))
    return names


def problems_text(table: RoutingTable) -> Mapping[str, list[str]]:
    """Problems by object, for the debug page and the log."""
    out: dict[str, list[str]] = {}
    for p in table.problems:
        out.setdefault(p.object, []).append(f"{p.severity}: {p.field}: {p.message}")
    return out
