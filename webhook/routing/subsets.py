"""Which TrafficPolicy each Service gets, and the subset clusters those policies define
(pure).

The oldest policy targeting a Service wins; a later one, or one naming no Service of the mesh,
is a problem and applies to nothing. Every subset of a policy becomes one cluster per port of
the Service (``outbound|<port>|<subset>|<host>``), whether or not an endpoint matches yet.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from webhook.discovery.model import MeshModel, Service, ServicePort
from webhook.routing.api import TRAFFIC_POLICY, Problem
from webhook.routing.policy import TrafficPolicy

__all__ = [
    "SubsetCluster",
    "resolve_policies",
    "subset_cluster_name",
    "subset_clusters",
    "subset_endpoints",
]


def subset_cluster_name(svc: Service, port: ServicePort, subset: str) -> str:
    """``outbound|<port>|<subset>|<host>``: the Service port's cluster, narrowed to a subset."""
    return f"outbound|{port.port}|{subset}|{svc.host}"


@dataclass(frozen=True)
class SubsetCluster:
    name: str
    service: tuple[str, str]
    port: ServicePort
    subset: str
    labels: tuple[tuple[str, str], ...]


def resolve_policies(
    parsed: Iterable[TrafficPolicy],
    model: MeshModel,
    problems: list[Problem],
    applies: dict[str, list[str]],
) -> dict[tuple[str, str], TrafficPolicy]:
    """The TrafficPolicy of each Service (the oldest wins); ``applies`` records what each one
    applies to (nothing, for one that names no Service or comes second)."""
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


def subset_clusters(
    policies: Mapping[tuple[str, str], TrafficPolicy], model: MeshModel, problems: list[Problem]
) -> dict[str, SubsetCluster]:
    """One cluster per subset and Service port; a subset no ready endpoint matches is a
    warning (its requests get 503 until one does)."""
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
