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

A *producer* route (in the Service's own namespace) applies to every client. A *consumer*
route (in another namespace, for that namespace's clients only) is reported as not supported
yet and left out: it would need per-namespace route tables.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from webhook.discovery.model import Memo, MeshModel, Service, ServicePort
from webhook.routing.api import (
    GATEWAY_GROUP,
    GRPC_ROUTE,
    HTTP_ROUTE,
    REFERENCE_GRANT,
    TRAFFIC_POLICY,
    Problem,
    Severity,
)
from webhook.routing.policy import TrafficPolicy, parse_policy
from webhook.routing.routes import Backend, Match, Parent, Route, Rule, parse_route

__all__ = [
    "INVALID_BACKEND",
    "RouteEntry",
    "RoutingTable",
    "SubsetCluster",
    "Target",
    "build_table",
    "subset_cluster_name",
]

#: The cluster a route names for an unusable backend: it never exists, so Envoy answers
#: the route's ``cluster_not_found_response_code`` (500) for that share of requests.
INVALID_BACKEND: Final = "sidemesh-invalid-backend"


def subset_cluster_name(svc: Service, port: ServicePort, subset: str) -> str:
    """``outbound|<port>|<subset>|<host>``: the Service port's cluster, narrowed to a subset."""
    return f"outbound|{port.port}|{subset}|{svc.host}"


@dataclass(frozen=True)
class Target:
    cluster: str
    weight: int
    label: str


@dataclass(frozen=True)
class RouteEntry:
    """One Envoy route: one match of one rule, with its action."""

    source: str  # e.g. "HTTPRoute demo/reviews rules[0].matches[1]"
    match: Match
    rule: Rule
    targets: tuple[Target, ...]
    mirrors: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class SubsetCluster:
    name: str
    service: tuple[str, str]
    port: ServicePort
    subset: str
    labels: tuple[tuple[str, str], ...]


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
    policies = _policies(parsed, model, problems, applies)
    subsets = _subsets(policies, model, problems)
    routes = [get(o, parse_route) for k in (HTTP_ROUTE, GRPC_ROUTE) for o in objects.get(k, ())]
    grants = reference_grants(objects.get(REFERENCE_GRANT, ()))
    by_port: dict[str, list[tuple[tuple[Any, ...], RouteEntry]]] = {}
    backends: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for route in sorted(routes, key=lambda r: (r.created, r.namespace, r.name, r.kind)):
        problems.extend(route.problems)
        ports = _attached_ports(route, model, problems)
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


def _policies(
    parsed: Iterable[TrafficPolicy],
    model: MeshModel,
    problems: list[Problem],
    applies: dict[str, list[str]],
) -> dict[tuple[str, str], TrafficPolicy]:
    out: dict[tuple[str, str], TrafficPolicy] = {}
    for policy in sorted(parsed, key=lambda p: (p.created, p.name)):
        problems.extend(policy.problems)
        key = (policy.namespace, policy.service)
        if not policy.service:
            continue
        if key not in model.services:
            problems.append(
                _problem(
                    policy,
                    "spec.targetRef.name",
                    f"no Service {policy.service!r} in namespace {policy.namespace}; "
                    "the policy applies to nothing",
                )
            )
            applies[policy.ref] = []
            continue
        if key in out:
            problems.append(
                _problem(
                    policy,
                    "spec.targetRef",
                    f"Service {policy.service} already has {out[key].ref} (the older one wins); "
                    "this one is ignored",
                )
            )
            applies[policy.ref] = []
            continue
        out[key] = policy
        svc = model.services[key]
        applies[policy.ref] = [f"{svc.namespace}/{svc.name}:{p.port}" for p in svc.ports]
    return out


def _problem(policy: TrafficPolicy, where: str, message: str, severity: str = "error") -> Problem:
    return Problem(TRAFFIC_POLICY, policy.namespace, policy.name, where, message, severity)  # type: ignore[arg-type]


def _subsets(
    policies: Mapping[tuple[str, str], TrafficPolicy], model: MeshModel, problems: list[Problem]
) -> dict[str, SubsetCluster]:
    out: dict[str, SubsetCluster] = {}
    for key, policy in policies.items():
        svc = model.services[key]
        for i, (subset, labels) in enumerate(policy.subsets):
            selected = 0
            for port in svc.ports:
                out[subset_cluster_name(svc, port, subset)] = SubsetCluster(
                    subset_cluster_name(svc, port, subset), key, port, subset, labels
                )
                selected += len(subset_endpoints(model, svc, port, labels))
            if not selected:
                problems.append(
                    _problem(
                        policy,
                        f"spec.subsets[{i}].labels",
                        f"no ready endpoint of {svc.name} has these labels (yet): "
                        f"requests to subset {subset} get 503",
                        "warning",
                    )
                )
    return out


def subset_endpoints(
    model: MeshModel, svc: Service, port: ServicePort, labels: Iterable[tuple[str, str]]
) -> tuple[Any, ...]:
    """The endpoints of ``svc``'s ``port`` whose pods carry all of ``labels``."""
    wanted = dict(labels)
    out = []
    for ep in model.endpoints_of(svc, port):
        pod = model.pods.get((svc.namespace, ep.pod)) if ep.pod else None
        if pod is not None and all(pod.labels.get(k) == v for k, v in wanted.items()):
            out.append(ep)
    return tuple(out)


def _about(route: Route, field: str, message: str, severity: Severity = "error") -> Problem:
    """A problem of ``route`` at ``field``."""
    return Problem(route.kind, route.namespace, route.name, field, message, severity)


def _attached_ports(
    route: Route, model: MeshModel, problems: list[Problem]
) -> list[tuple[Service, ServicePort]]:
    out: list[tuple[Service, ServicePort]] = []
    if not route.parents:
        problems.append(
            _about(
                route,
                "spec.parentRefs",
                "no Service parentRef: not a mesh route (Gateway parents are not sidemesh's)",
                "warning",
            )
        )
    for parent in route.parents:
        svc = _parent_service(route, parent, model, problems)
        if svc is None:
            continue
        for port in _parent_ports(route, parent, svc, problems):
            if (svc, port) not in out:
                out.append((svc, port))
    return out


def _parent_service(
    route: Route, parent: Parent, model: MeshModel, problems: list[Problem]
) -> Service | None:
    """The Service a parentRef names, when it exists and is in the route's namespace."""
    svc = model.services.get((parent.namespace, parent.service))
    if svc is None:
        problems.append(
            _about(
                route,
                parent.field,
                f"no Service {parent.namespace}/{parent.service}: the route applies to nothing",
            )
        )
        return None
    if parent.namespace != route.namespace:
        problems.append(
            _about(
                route,
                parent.field,
                "a consumer route (parent Service in another namespace) "
                "is not supported yet; left out",
            )
        )
        return None
    return svc


def _parent_ports(
    route: Route, parent: Parent, svc: Service, problems: list[Problem]
) -> list[ServicePort]:
    """The HTTP ports of ``svc`` the parentRef attaches to (its port, else every HTTP one)."""
    if parent.port is not None:
        ports = [p for p in svc.ports if p.port == parent.port]
        if not ports:
            have = ", ".join(str(p.port) for p in svc.ports)
            problems.append(
                _about(
                    route,
                    f"{parent.field}.port",
                    f"Service {svc.name} has no port {parent.port} (it has {have})",
                )
            )
    else:
        ports = [p for p in svc.ports if p.protocol != "tcp"]
        if not ports:
            problems.append(
                _about(
                    route,
                    parent.field,
                    f"Service {svc.name} has only declared-TCP ports: no HTTP to route",
                )
            )
    for port in ports:
        if port.protocol == "tcp":
            problems.append(
                _about(
                    route,
                    parent.field,
                    f"port {port.port} of {svc.name} is declared TCP ({port.name}): "
                    "HTTP routes do not apply",
                )
            )
    return [p for p in ports if p.protocol != "tcp"]


def _entries(
    route: Route,
    model: MeshModel,
    refs: tuple[Mapping[tuple[str, str], TrafficPolicy], frozenset[Grant]],
    problems: list[Problem],
) -> list[tuple[tuple[Any, ...], RouteEntry]]:
    out = []
    for rule in route.rules:
        targets = tuple(_target(route, b, model, refs, problems) for b in rule.backends)
        targets = tuple(t for t in targets if t.weight > 0)
        mirrors = []
        for m in rule.mirrors:
            t = _target(route, m.backend, model, refs, problems)
            if t.cluster != INVALID_BACKEND:
                mirrors.append((t.cluster, m.percent))
        for i, match in enumerate(rule.matches):
            source = f"{route.kind} {route.namespace}/{route.name} rules[{rule.index}]"
            if len(rule.matches) > 1:
                source += f".matches[{i}]"
            entry = RouteEntry(source, match, rule, targets, tuple(mirrors))
            out.append((_precedence(match, route, rule.index, i), entry))
    return out


def _target(
    route: Route,
    b: Backend,
    model: MeshModel,
    refs: tuple[Mapping[tuple[str, str], TrafficPolicy], frozenset[Grant]],
    problems: list[Problem],
) -> Target:
    policies, grants = refs
    if b.invalid:
        return Target(INVALID_BACKEND, b.weight, b.label)
    if b.namespace != route.namespace and not granted(grants, route, b.namespace, b.service):
        problems.append(
            _about(
                route,
                b.field,
                f"a backend in namespace {b.namespace} needs a ReferenceGrant there from "
                f"{route.kind}s of namespace {route.namespace}: its share of requests gets 500",
            )
        )
        return Target(INVALID_BACKEND, b.weight, b.label)
    svc = model.services.get((b.namespace, b.service))
    if svc is None:
        problems.append(
            _about(
                route,
                b.field,
                f"no Service {b.namespace}/{b.service}: its share of requests gets 500",
            )
        )
        return Target(INVALID_BACKEND, b.weight, b.label)
    port = next((p for p in svc.ports if p.port == b.port), None)
    if port is None:
        problems.append(
            _about(
                route,
                f"{b.field}.port",
                f"Service {svc.name} has no port {b.port}: its share of requests gets 500",
            )
        )
        return Target(INVALID_BACKEND, b.weight, b.label)
    if b.subset is None:
        return Target(svc.cluster_name(port), b.weight, b.label)
    policy = policies.get((svc.namespace, svc.name))
    if policy is None or policy.subset_labels(b.subset) is None:
        where = (
            f"{policy.ref} defines none named {b.subset!r}"
            if policy
            else "no TrafficPolicy targets it"
        )
        problems.append(
            _about(
                route,
                f"{b.field}.name",
                f"Service {svc.name} has no subset {b.subset!r} ({where}): "
                f"its share of requests gets 500",
            )
        )
        return Target(INVALID_BACKEND, b.weight, b.label)
    return Target(subset_cluster_name(svc, port, b.subset), b.weight, b.label)


#: ``(to namespace, from kind, from namespace, Service name or "" for all)``.
Grant = tuple[str, str, str, str]


def reference_grants(objs: Iterable[Mapping[str, Any]]) -> frozenset[Grant]:
    """What the ReferenceGrants allow: routes of a kind and namespace to a namespace's Services
    (all of them, or the named one). Entries for other kinds are not the mesh's."""
    out: set[Grant] = set()
    for obj in objs:
        meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
        to_ns = str(meta.get("namespace") or "")
        froms = [
            (str(f.get("kind")), str(f.get("namespace")))
            for f in spec.get("from") or []
            if isinstance(f, Mapping) and f.get("group") == GATEWAY_GROUP
        ]
        tos = [
            str(t.get("name") or "")
            for t in spec.get("to") or []
            if isinstance(t, Mapping)
            and (t.get("group") or "") == ""
            and t.get("kind") == "Service"
        ]
        out.update((to_ns, kind, ns, name) for kind, ns in froms for name in tos)
    return frozenset(out)


def granted(grants: frozenset[Grant], route: Route, namespace: str, service: str) -> bool:
    return any((namespace, route.kind, route.namespace, name) in grants for name in ("", service))


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
