"""What every proxy may share: one encoded cluster, endpoint set and route table per Service
port (and per traffic-rule subset), kept in change-logged tables.

A resource is re-encoded only when what it is built from changed; each proxy then takes what
changed since its last push from the tables' logs (see :mod:`webhook.discovery.tables`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from webhook.dataplane.bootstrap import BootstrapOptions
from webhook.discovery import compiler as cc, l7
from webhook.discovery.clusters import build_endpoints
from webhook.discovery.model import MeshModel, Service, ServicePort
from webhook.discovery.resources import encode
from webhook.discovery.tables import ResourceTable, TypeState
from webhook.routing import xds as routing
from webhook.routing.table import RoutingTable

__all__ = ["SHARED_TYPES", "SharedResources"]

SHARED_TYPES = (cc.CLUSTER, cc.ENDPOINTS, cc.ROUTE)


class _HasTypes(Protocol):
    def state(self, type_url: str) -> TypeState: ...


class SharedResources:
    """The shared tables, and what each resource in them was built from."""

    def __init__(self) -> None:
        self.tables = {t: ResourceTable(t) for t in SHARED_TYPES}
        #: Every cluster name in the tables (an unscoped proxy's scope).
        self.all_clusters: frozenset[str] = frozenset()
        self._cluster_inputs: dict[str, Any] = {}
        self._cla_inputs: dict[str, Any] = {}
        self._route_inputs: dict[str, Any] = {}

    def update(
        self,
        model: MeshModel,
        rules: RoutingTable,
        opts: BootstrapOptions,
        only: Iterable[Service] | None = None,
    ) -> None:
        """Encode what changed; ``only`` these Services (endpoint fast path), else all."""
        seen: set[str] = set()
        for svc in model.services.values() if only is None else only:
            for port in svc.ports:
                name = svc.cluster_name(port)
                seen.add(name)
                self._service_port(model, rules, opts, svc, port, name)
            for sub, eps in routing.subset_inputs(rules, model, svc):
                seen.add(sub.name)  # a subset's cluster: built only when what it reads changed
                inputs = (svc.cluster_ips, sub, eps, rules.policy_for(svc))
                if (self._cluster_inputs.get(sub.name), self._cla_inputs.get(sub.name)) != (
                    inputs,
                    eps,
                ):
                    cluster, cla = routing.subset_cluster(rules, svc, sub, eps, opts)
                    self._cluster_inputs[sub.name], self._cla_inputs[sub.name] = inputs, eps
                    self.tables[cc.CLUSTER].put(sub.name, encode(cc.CLUSTER, cluster))
                    self.tables[cc.ENDPOINTS].put(sub.name, encode(cc.ENDPOINTS, cla))
        if only is not None:
            return
        self._update_routes(model, rules)
        for name in set(self._cluster_inputs) - seen:
            del self._cluster_inputs[name]
            self._cla_inputs.pop(name, None)
            for table in self.tables.values():
                table.remove(name)
        self.all_clusters = frozenset(seen)

    def _service_port(
        self,
        model: MeshModel,
        rules: RoutingTable,
        opts: BootstrapOptions,
        svc: Service,
        port: ServicePort,
        name: str,
    ) -> None:
        eps = model.endpoints_of(svc, port)
        ids = tuple(sorted({e.mtls_identity for e in eps if e.mtls_identity}))
        policy = rules.policy_for(svc)
        if self._cluster_inputs.get(name) != (svc.cluster_ips, port, ids, policy):
            self._cluster_inputs[name] = (svc.cluster_ips, port, ids, policy)
            cluster = routing.service_cluster(rules, svc, port, eps, opts)
            self.tables[cc.CLUSTER].put(name, encode(cc.CLUSTER, cluster))
        if self._cla_inputs.get(name) != eps:
            self._cla_inputs[name] = eps
            self.tables[cc.ENDPOINTS].put(name, encode(cc.ENDPOINTS, build_endpoints(name, eps)))

    def _update_routes(self, model: MeshModel, rules: RoutingTable) -> None:
        """Each HTTP-capable Service port's RouteConfiguration (a config change: endpoint
        changes never touch routes)."""
        table = self.tables[cc.ROUTE]
        wanted: dict[str, Any] = {}
        for svc in model.services.values():
            if not svc.cluster_ips:
                continue
            for port in svc.ports:
                if l7.is_http(port):
                    wanted[svc.cluster_name(port)] = (svc, port)
        for name, (svc, port) in wanted.items():
            inputs = (svc, port, routing.route_inputs(rules, svc, port))
            if self._route_inputs.get(name) != inputs:
                self._route_inputs[name] = inputs
                routes = routing.port_routes(rules, svc, port)  # None: the default
                table.put(name, encode(cc.ROUTE, l7.route_config(svc, port, routes)))
        for name in set(table.items) - set(wanted):
            self._route_inputs.pop(name, None)
            table.remove(name)

    def compact(self, proxies: Iterable[_HasTypes]) -> None:
        """Forget change-log entries every connected proxy has already been sent."""
        conns = list(proxies)
        for table in self.tables.values():
            oldest = min((c.state(table.type_url).seq for c in conns), default=table.seq)
            table.compact(oldest)
