"""What a route's references resolve to (pure): its ``parentRefs`` to the Service ports it
attaches to, its ``backendRefs`` to the clusters it sends to.

Each reference that cannot be used is a :class:`~webhook.routing.api.Problem` of the route: a
parent that names no usable Service port is left out; a backend that names no usable cluster
(a missing Service, port or subset, or another namespace without a ReferenceGrant) keeps its
weight and gets :data:`INVALID_BACKEND`, so its share of requests gets 500.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from webhook.discovery.model import MeshModel, Service, ServicePort
from webhook.routing.api import GATEWAY_GROUP, Problem, Severity
from webhook.routing.policy import TrafficPolicy
from webhook.routing.routes import Backend, Parent, Route
from webhook.routing.subsets import subset_cluster_name

__all__ = [
    "INVALID_BACKEND",
    "Grant",
    "Target",
    "attached_ports",
    "backend_target",
    "granted",
    "reference_grants",
]

#: The cluster a route names for an unusable backend: it never exists, so Envoy answers
#: the route's ``cluster_not_found_response_code`` (500) for that share of requests.
INVALID_BACKEND: Final = "sidemesh-invalid-backend"


@dataclass(frozen=True)
class Target:
    """Where a share of a route's requests goes: a cluster, its weight, the backend's label."""

    cluster: str
    weight: int
    label: str


def _about(route: Route, field: str, message: str, severity: Severity = "error") -> Problem:
    """A problem of ``route`` at ``field``."""
    return Problem(route.kind, route.namespace, route.name, field, message, severity)


def attached_ports(
    route: Route, model: MeshModel, problems: list[Problem]
) -> list[tuple[Service, ServicePort]]:
    """The Service ports ``route`` attaches to, each once, in the order of its parentRefs."""
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


def backend_target(
    route: Route,
    b: Backend,
    model: MeshModel,
    refs: tuple[Mapping[tuple[str, str], TrafficPolicy], frozenset[Grant]],
    problems: list[Problem],
) -> Target:
    """The cluster a backendRef sends to (:data:`INVALID_BACKEND` when unusable), with its
    weight; ``refs`` are the resolved policies (for subsets) and the ReferenceGrants."""
    policies, grants = refs
    found = None if b.invalid else _service_port(route, b, model, grants, problems)
    if found is None:
        return Target(INVALID_BACKEND, b.weight, b.label)
    svc, port = found
    if b.subset is None:
        return Target(svc.cluster_name(port), b.weight, b.label)
    cluster = _subset_cluster(route, b, b.subset, (svc, port), policies, problems)
    return Target(cluster or INVALID_BACKEND, b.weight, b.label)


def _service_port(
    route: Route, b: Backend, model: MeshModel, grants: frozenset[Grant], problems: list[Problem]
) -> tuple[Service, ServicePort] | None:
    """The Service port a backendRef names, when the route may send there and it exists."""
    if b.namespace != route.namespace and not granted(grants, route, b.namespace, b.service):
        problems.append(
            _about(
                route,
                b.field,
                f"a backend in namespace {b.namespace} needs a ReferenceGrant there from "
                f"{route.kind}s of namespace {route.namespace}: its share of requests gets 500",
            )
        )
        return None
    svc = model.services.get((b.namespace, b.service))
    if svc is None:
        problems.append(
            _about(
                route,
                b.field,
                f"no Service {b.namespace}/{b.service}: its share of requests gets 500",
            )
        )
        return None
    port = next((p for p in svc.ports if p.port == b.port), None)
    if port is None:
        problems.append(
            _about(
                route,
                f"{b.field}.port",
                f"Service {svc.name} has no port {b.port}: its share of requests gets 500",
            )
        )
        return None
    return svc, port


def _subset_cluster(
    route: Route,
    b: Backend,
    subset: str,
    target: tuple[Service, ServicePort],
    policies: Mapping[tuple[str, str], TrafficPolicy],
    problems: list[Problem],
) -> str | None:
    """The cluster of ``subset`` of the Service port a backendRef names, when a policy of that
    Service defines it."""
    svc, port = target
    policy = policies.get((svc.namespace, svc.name))
    if policy is None or policy.subset_labels(subset) is None:
        where = (
            f"{policy.ref} defines none named {subset!r}"
            if policy
            else "no TrafficPolicy targets it"
        )
        problems.append(
            _about(
                route,
                f"{b.field}.name",
                f"Service {svc.name} has no subset {subset!r} ({where}): "
                f"its share of requests gets 500",
            )
        )
        return None
    return subset_cluster_name(svc, port, subset)


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
