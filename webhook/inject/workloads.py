"""Finding the pod template(s) in a Kubernetes object, and injecting each one.

| kind                                                        | pod template at                    |
|-------------------------------------------------------------|------------------------------------|
| Pod                                                         | the object itself                  |
| Deployment, StatefulSet, DaemonSet, ReplicaSet, Job,        | ``spec.template``                  |
| ReplicationController                                       |                                    |
| CronJob                                                     | ``spec.jobTemplate.spec.template`` |
| List                                                        | each of ``items``, recursively     |

Every other kind passes through unchanged. Labels and annotations are read from and written to
the pod template (never to a CronJob's ``jobTemplate.metadata``), because that is what the pods
will carry and what the webhook will see. The namespace is the object's, else the one given,
else ``default``. Pure: the CLI uses these, the webhook calls :func:`webhook.inject.pod.inject_pod`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from webhook.config import MeshConfig
from webhook.errors import InjectionError
from webhook.inject.annotations import sidemesh_keys
from webhook.inject.patch import pointer
from webhook.inject.pod import Injection, inject_pod, is_injected, uninject_pod
from webhook.inject.policy import Decision

__all__ = [
    "NOT_A_WORKLOAD",
    "TEMPLATE_PATHS",
    "ObjectResult",
    "TemplateResult",
    "check_object",
    "inject_object",
    "uninject_object",
]

#: Where each workload kind keeps its pod template (an empty path: the object is the pod).
TEMPLATE_PATHS: Final[dict[str, tuple[str, ...]]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}
#: The reason reported for objects that have no pod template (Service, ConfigMap …).
NOT_A_WORKLOAD: Final = "not-a-workload"


@dataclass(frozen=True)
class TemplateResult:
    """What happened to one pod template."""

    kind: str
    name: str
    namespace: str
    item: str
    """JSON pointer of the object inside its document: '' unless it is an item of a List."""
    path: str
    """JSON pointer of the template inside the document ('' for a Pod, '/items/0/…' in Lists)."""
    decision: Decision
    patch: list[dict[str, Any]]
    """The patch the webhook would return for a pod made from this template."""
    read: list[str]
    """The sidemesh labels/annotations found on the template."""
    injected: bool
    """Whether the template carries sidemesh's status after the operation."""


@dataclass
class ObjectResult:
    """One document after the operation, and what happened to each of its pod templates."""

    obj: Any
    templates: list[TemplateResult] = field(default_factory=list)
    passed_through: list[str] = field(default_factory=list)
    """``Kind [namespace/]name`` of objects without a pod template (reason: NOT_A_WORKLOAD)."""


PodFn = Callable[[Mapping[str, Any], str], Injection]


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _label(obj: Mapping[str, Any]) -> str:
    name = _meta(obj).get("name") or _meta(obj).get("generateName") or "<unnamed>"
    return f"{obj.get('kind')}/{name}"


def _walk(
    obj: Any, namespace: str | None, fn: PodFn, result: ObjectResult, base: tuple[Any, ...]
) -> Any:
    if not isinstance(obj, Mapping):
        raise InjectionError(f"{pointer(*base) or 'document'} is not an object")
    kind = obj.get("kind")
    ns = _meta(obj).get("namespace") or namespace or "default"
    if kind == "List":
        items = obj.get("items")
        if not isinstance(items, list):
            raise InjectionError(f"{_label(obj)}: items must be a list")
        out = list(items)
        for i, item in enumerate(items):
            if item is not None:  # `- null` items: kubectl ignores them, so do we
                out[i] = _walk(item, ns, fn, result, (*base, "items", i))
        return {**obj, "items": out}
    if not isinstance(kind, str) or kind not in TEMPLATE_PATHS:
        explicit = _meta(obj).get("namespace")
        name = _meta(obj).get("name") or "<unnamed>"
        at = f"{pointer(*base)}: " if base else ""
        result.passed_through.append(
            f"{at}{kind or 'object without kind'} {f'{explicit}/' if explicit else ''}{name}"
        )
        return obj
    path = TEMPLATE_PATHS[kind]
    try:
        template: Any = obj
        for key in path:
            template = template.get(key) if isinstance(template, Mapping) else None
        if not isinstance(template, Mapping):
            raise InjectionError(f"has no pod template at {'.'.join(path)}")
        injection = fn(template, str(ns))
    except InjectionError as exc:
        at = f"{pointer(*base)}: " if base else ""
        raise InjectionError(f"{at}{_label(obj)}: {exc}") from exc
    meta = _meta(template)
    result.templates.append(
        TemplateResult(
            kind=kind,
            name=str(_meta(obj).get("name") or _meta(obj).get("generateName") or ""),
            namespace=str(ns),
            item=pointer(*base),
            path=pointer(*base, *path),
            decision=injection.decision,
            patch=injection.patch,
            read=sidemesh_keys(meta.get("labels") or {}, meta.get("annotations") or {}),
            injected=is_injected(injection.pod),
        )
    )
    return _replace_at(obj, path, injection.pod)


def _replace_at(obj: Mapping[str, Any], path: tuple[str, ...], value: Any) -> Any:
    """A copy of ``obj`` with ``value`` at ``path``; only the objects on the path are copied."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    return {**obj, head: _replace_at(obj[head], rest, value)}


def _run(obj: Any, namespace: str | None, fn: PodFn) -> ObjectResult:
    result = ObjectResult(obj=None)
    result.obj = _walk(obj, namespace, fn, result, ())
    return result


def inject_object(
    obj: Any, *, namespace: str | None, config: MeshConfig, bundle: str
) -> ObjectResult:
    """Inject every pod template of ``obj`` (InjectionError names the object on failure)."""

    def fn(pod: Mapping[str, Any], ns: str) -> Injection:
        return inject_pod(pod, namespace=ns, config=config, bundle=bundle)

    return _run(obj, namespace, fn)


def check_object(
    obj: Any, *, namespace: str | None, config: MeshConfig, bundle: str
) -> ObjectResult:
    """Like :func:`inject_object` but the returned object is the input, unchanged."""
    result = inject_object(obj, namespace=namespace, config=config, bundle=bundle)
    result.obj = obj
    return result


def uninject_object(obj: Any, *, namespace: str | None = None) -> ObjectResult:
    """Remove sidemesh from every pod template of ``obj``.

    The decision reads ``uninjected`` for templates that carried sidemesh, ``not-injected``
    for the others.
    """

    def fn(pod: Mapping[str, Any], ns: str) -> Injection:
        if not is_injected(pod):
            return Injection(Decision(False, "not-injected"), dict(pod), [])
        return Injection(Decision(True, "uninjected"), uninject_pod(pod), [])

    return _run(obj, namespace, fn)
