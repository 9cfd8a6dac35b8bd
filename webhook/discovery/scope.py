"""Which Services a sidecar sees when scoping is on: a sidecar's config must not grow with the
size of the mesh, only with what its workload uses.

A pod sees the Services of its own namespace, the ones it declares in the
``sidemesh.io/dependencies`` annotation (``name`` in its namespace or ``namespace/name``,
comma-separated; ``namespace/*`` for a whole namespace), and the ones the control plane learned
it calls (``learned``: the destinations its sidecar reported). Pure.
"""

from __future__ import annotations

from collections.abc import Iterable

from webhook.discovery.model import MeshModel, PodInfo, Service

__all__ = ["parse_dependency", "services_in_scope"]


def parse_dependency(raw: str, own_namespace: str) -> tuple[str, str]:
    """``"name"`` → ``(own, name)``; ``"ns/name"`` and ``"name.ns"`` → ``(ns, name)``."""
    text = raw.strip()
    if "/" in text:
        ns, _, name = text.partition("/")
        return ns.strip(), name.strip()
    name, dot, rest = text.partition(".")
    if dot:
        return rest.split(".", 1)[0], name  # name.ns or name.ns.svc.cluster.local
    return own_namespace, name


def services_in_scope(
    model: MeshModel, pod: PodInfo, learned: Iterable[tuple[str, str]] = ()
) -> list[Service]:
    wanted = {parse_dependency(d, pod.namespace) for d in pod.dependencies}
    wanted.update(learned)
    whole = {ns for ns, name in wanted if name == "*"} | {pod.namespace}
    return [
        svc
        for key, svc in sorted(model.services.items())
        if svc.namespace in whole or key in wanted
    ]
