"""Rules resolved against the mesh: which routes each Service port gets, which policy each
cluster gets, which subset clusters exist, and everything that is wrong (pure).

:func:`build_table` is what the control plane runs on every change and what
``sidemesh check`` runs offline; both get the same :class:`RoutingTable`.

Route order follows the Gateway API's precedence, over every route attached to one Service
port: an ``Exact`` path first, then ``RegularExpression`` and ``PathPrefix`` paths, longest
value first (a regex ranks before a prefix of the same length: it is the more specific
intent); then a rule with a method before one without, more header matches first, more
query-parameter matches first; then the older route, then the route's ``namespace/name``;
then rule and match order.

What each reference of a route resolves to is :mod:`webhook.routing.refs`; which policy each
Service gets and the subset clusters it defines, :mod:`webhook.routing.subsets`.

A *producer* route (in the Service's own namespace) applies to every client. A *consumer*
route (in another namespace, for that namespace's clients only) is reported as not supported
yet and left out: it would need per-namespace route tables.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from webhook.discovery.build import Memo
from webhook.discovery.model import MeshModel, Service
from webhook.routing.api import (
    GRPC_ROUTE,
    HTTP_ROUTE,
    REFERENCE_GRANT,
    TRAFFIC_POLICY,
    Problem,
)
from webhook.routing.matches import Match
from webhook.routing.policy import TrafficPolicy, parse_policy
from webhook.routing.refs import (
    INVALID_BACKEND,
    Grant,
    Target,
    attached_ports,
    backend_target,
    reference_grants,
)
from webhook.routing.routes import Backend, Route, Rule, parse_route
from webhook.routing.subsets import SubsetCluster, resolve_policies, subset_clusters

__all__ = [
    "EMPTY",
    "RouteEntry",
    "RoutingTable",
    "build_table",
]


@dataclass(frozen=True)
class RouteEntry:
    """One Envoy route: one match of one rule, with its action."""

    source: str  # e.g. "HTTPRoute demo/reviews rules[0].matches[1]"
    match: Match
    rule: Rule
    targets: tuple[Target, ...]
    mirrors: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class RoutingTable:
    #: RouteConfiguration name (the Service port's cluster name) → its routes, in order. A
    #: Service port without attached routes is absent: it keeps the one default route.
    routes: Mapping[str, tuple[RouteEntry, ...]] = field(default_factory=dict)
    #: ``(namespace, service)`` → the TrafficPolicy that targets it.
    policies: Mapping[tuple[str, str], TrafficPolicy] = field(default_factory=dict)
    subsets: Mapping[str, SubsetCluster] = field(default_factory=dict)
    #: ``(namespace, service)`` → the Services its routes send to (scoping follows them).
    backends: Mapping[tuple[str, str], frozenset[tuple[str, str]]] = field(default_factory=dict)
    problems: tuple[Problem, ...] = ()
    #: Which object each route/policy came from, for explanations: ref → attached Service ports.
    applies_to: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def policy_for(self, svc: Service) -> TrafficPolicy | None:
        return self.policies.get((svc.namespace, svc.name))

    def subsets_of(self, svc: Service) -> list[SubsetCluster]:
        key = (svc.namespace, svc.name)
        return [s for s in self.subsets.values() if s.service == key]


EMPTY: Final = RoutingTable()


def build_table(
    objects: Mapping[str, Iterable[Mapping[str, Any]]],
    model: MeshModel,
    memo: Memo | None = None,
) -> RoutingTable:
    """The routing table of the rule objects in ``objects`` (by kind) over ``model``;
    ``memo`` keeps parsed objects between builds (the push engine's parse cache)."""
    get = memo.get if memo is not None else (lambda obj, parse: parse(obj))
    problems: list[Problem] = []
    applies: dict[str, list[str]] = {}
    parsed = [get(o, parse_policy) for o in objects.get(TRAFFIC_POLICY, ())]
    policies = resolve_policies(parsed, model, problems, applies)
    subsets = subset_clusters(policies, model, problems)
    routes = [get(o, parse_route) for k in (HTTP_ROUTE, GRPC_ROUTE) for o in objects.get(k, ())]
    grants = reference_grants(objects.get(REFERENCE_GRANT, ()))
    by_port: dict[str, list[tuple[tuple[Any, ...], RouteEntry]]] = {}
    backends: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for route in sorted(routes, key=lambda r: (r.created, r.namespace, r.name, r.kind)):
        problems.extend(route.problems)
        ports = attached_ports(route, model, problems)
        applies[route.ref] = [f"{s.namespace}/{s.name}:{p.port}" for s, p in ports]
        if not ports:
            continue
        entries = _entries(route, model, (policies, grants), problems)
        for svc, port in ports:
            name = svc.cluster_name(port)
            by_port.setdefault(name, []).extend(entries)
            used = {(t.namespace, t.service) for _, e in entries for t in _refs(e.rule)}
            backends.setdefault((svc.namespace, svc.name), set()).update(used)
    ordered = {
        name: tuple(e for _, e in sorted(items, key=lambda x: x[0]))
        for name, items in by_port.items()
    }
    return RoutingTable(
        routes=ordered,
        policies=policies,
        subsets=subsets,
        backends={k: frozenset(v) for k, v in backends.items()},
        problems=tuple(problems),
        applies_to={k: tuple(v) for k, v in applies.items()},
    )


def _refs(rule: Rule) -> list[Backend]:
    return [b for b in rule.backends if not b.invalid] + [m.backend for m in rule.mirrors]


def _entries(
    route: Route,
    model: MeshModel,
    refs: tuple[Mapping[tuple[str, str], TrafficPolicy], frozenset[Grant]],
    problems: list[Problem],
) -> list[tuple[tuple[Any, ...], RouteEntry]]:
    out = []
    for rule in route.rules:
        targets = tuple(backend_target(route, b, model, refs, problems) for b in rule.backends)
        targets = tuple(t for t in targets if t.weight > 0)
        mirrors = []
        for m in rule.mirrors:
            t = backend_target(route, m.backend, model, refs, problems)
            if t.cluster != INVALID_BACKEND:
                mirrors.append((t.cluster, m.percent))
        for i, match in enumerate(rule.matches):
            source = f"{route.kind} {route.namespace}/{route.name} rules[{rule.index}]"
            if len(rule.matches) > 1:
                source += f".matches[{i}]"
            entry = RouteEntry(source, match, rule, targets, tuple(mirrors))
            out.append((_precedence(match, route, rule.index, i), entry))
    return out


def _precedence(match: Match, route: Route, rule: int, index: int) -> tuple[Any, ...]:
    kind = {"Exact": 0, "RegularExpression": 1, "PathPrefix": 1}[match.path.type]
    regex_first = 0 if match.path.type == "RegularExpression" else 1
    return (
        kind,
        -len(match.path.value) if kind else 0,
        regex_first,
        match.method is None,
        -len(match.headers),
        -len(match.query),
        route.created,
        route.namespace,
        route.name,
        rule,
        index,
    )
