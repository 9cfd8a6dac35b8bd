"""The injection core: a pod in, the injected pod and its JSON patch out. Pure.

``inject_pod`` follows the decision (:mod:`webhook.inject.policy`), checks for conflicts
(:mod:`webhook.inject.conflicts`), then runs the mutation steps in order; each step changes a
copy of the pod *and* records the RFC 6902 operation doing the same
(:mod:`webhook.inject.patch`), so the patch is never computed by diffing:

1. probes of app containers (and user init containers) rewritten to the probe port,
2. ``sidemesh-init`` (and, native, ``sidemesh-proxy``) inserted first in ``initContainers``,
3. classic mode: ``sidemesh-proxy`` appended to ``containers`` (hold mode: inserted first),
4. the four volumes appended,
5. annotations: trust bundle, default container, Prometheus (unless the pod has its own), and
   last ``sidemesh.io/status``: a JSON record of exactly what was added, including the original
   probes and which fields did not exist, so :func:`uninject_pod` restores the pod exactly
   (:mod:`webhook.inject.uninject`).

Copies are shallow along the changed paths only: the result shares untouched subtrees (env
lists, volumes, managedFields …) with the input. Treat both as read-only; the input is never
modified. What sidemesh adds is built fresh for every pod: only immutable strings are worked
out once per (config, overrides) (:mod:`webhook.inject.containers`), so two results never share a
list or dict — changing one cannot change the next, and a YAML dump of several injected
templates in one document has no anchors. An injected pod is refreshed by uninjecting then
injecting again (one patch); when that gives the same pod the answer is ``already-injected``
with an empty patch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from webhook import __version__, names
from webhook.config import MeshConfig
from webhook.errors import InjectionError
from webhook.inject.annotations import PROMETHEUS, Overrides, read_overrides
from webhook.inject.conflicts import check_conflicts
from webhook.inject.containers import (
    SIDEMESH_VOLUMES,
    init_args,
    init_container,
    proxy_container,
    validate_container,
    volumes,
)
from webhook.inject.patch import Patch
from webhook.inject.policy import ALREADY_INJECTED, Decision, decide
from webhook.inject.probes import rewrite_container
from webhook.inject.uninject import (
    ANNOTATION_PATHS,
    annotations_of,
    is_injected,
    read_status,
    uninject,
)

__all__ = ["Injection", "inject_pod", "is_injected", "read_status", "uninject_pod"]

_PROMETHEUS = frozenset(PROMETHEUS)
# Values JSON has no type for (bytes from YAML's !!binary …) are written as strings.
_json_fallback = json.JSONEncoder(separators=(",", ":"), default=str).encode


def _to_json(value: Any) -> str:
    """Compact, deterministic JSON (key order kept) for the status and the probe table.

    orjson is an order of magnitude faster than the standard encoder on a status; values
    orjson refuses (integers beyond 64 bits in a user's probe …) go through the standard one.
    """
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return _json_fallback(value)


@dataclass(frozen=True)
class Injection:
    """The answer for one pod: the decision, the resulting pod and the patch to get there."""

    decision: Decision
    pod: dict[str, Any]
    patch: list[dict[str, Any]]


# --- reading ---------------------------------------------------------------------------------


def _shape_error(where: str, what: str) -> InjectionError:
    return InjectionError(f"{where} must be {what}")


def _check_shape(pod: Mapping[str, Any]) -> None:
    """Refuse what the API server would never send, with a message instead of a traceback."""
    if not isinstance(pod, dict):
        raise _shape_error("a pod", "an object")
    meta = pod.get("metadata")
    if meta is not None:
        if not isinstance(meta, dict):
            raise _shape_error("metadata", "an object")
        for key in ("labels", "annotations"):
            value = meta.get(key)
            if value is not None and not isinstance(value, dict):
                raise _shape_error(f"metadata.{key}", "an object")
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        raise _shape_error("spec", "an object (a pod needs a spec)")
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        raise _shape_error("spec.containers", "a non-empty list")
    for field in ("containers", "initContainers", "volumes"):
        items = spec.get(field)
        if items is None:
            continue
        if not isinstance(items, list):
            raise _shape_error(f"spec.{field}", "a list")
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise _shape_error(f"spec.{field}[{i}]", "an object with a name")
            if field == "volumes":
                continue
            ports = item.get("ports")
            if ports is not None and not isinstance(ports, list):
                raise _shape_error(f"spec.{field}[{i}].ports", "a list")


# --- inject ----------------------------------------------------------------------------------


def _was(container: Mapping[str, Any], key: str) -> str | None:
    """'absent' / 'null' when ``key`` must be created; None when it is already there."""
    if key not in container:
        return "absent"
    return "null" if container[key] is None else None


def _rewrite_probes(
    containers: list[dict[str, Any]],
    inits: list[dict[str, Any]],
    config: MeshConfig,
    patch: Patch,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Step 1: probes pointed at the proxy's probe port, at the indices of the input (before
    anything is inserted). Returns the original probes by container and the app's handlers."""
    originals: dict[str, Any] = {}
    handlers: dict[str, Any] = {}
    for field, items in (("containers", containers), ("initContainers", inits)):
        for i, c in enumerate(items):
            rw = rewrite_container(c, config.ports.probes)
            if rw is None:
                continue
            items[i] = {**c, **rw.probes}
            at = f"/spec/{field}/{i}/"
            for kind, probe in rw.probes.items():
                patch.replace(at + kind, probe)
            originals[c["name"]] = rw.originals
            handlers.update(rw.handlers)
    return originals, handlers


def _add_init_containers(
    spec: dict[str, Any],
    ours: list[dict[str, Any]],
    inits: list[dict[str, Any]],
    created: dict[str, str],
    patch: Patch,
) -> None:
    """Step 2: our init containers first (capture rules, then a native proxy), then the user's."""
    was = _was(spec, "initContainers")
    if was:
        created["spec.initContainers"] = was
        patch.add("/spec/initContainers", list(ours))
    else:
        for k, c in enumerate(ours):
            patch.add(f"/spec/initContainers/{k}", c)
    spec["initContainers"] = ours + inits


def _add_volumes(spec: dict[str, Any], created: dict[str, str], patch: Patch) -> None:
    """Step 4: our volumes, appended."""
    ours = volumes()
    was = _was(spec, "volumes")
    if was:
        created["spec.volumes"] = was
        patch.add("/spec/volumes", list(ours))
        spec["volumes"] = ours
    else:
        for v in ours:
            patch.add("/spec/volumes/-", v)
        spec["volumes"] = [*spec["volumes"], *ours]


def _added_annotations(
    pod: Mapping[str, Any],
    ann_in: Mapping[str, Any],
    config: MeshConfig,
    bundle: str,
    ov: Overrides,
) -> dict[str, str]:
    """The annotations step 5 adds, before the status: a user's own value is kept."""
    added: dict[str, str] = {names.TRUST_BUNDLE_ANNOTATION: bundle}
    if ov.cni:
        added[names.CNI_CAPTURE] = _to_json(init_args(config, ov))
    if names.DEFAULT_CONTAINER not in ann_in:
        added[names.DEFAULT_CONTAINER] = pod["spec"]["containers"][0]["name"]
    if _PROMETHEUS.isdisjoint(ann_in):
        added[PROMETHEUS[0]] = "true"
        added[PROMETHEUS[1]] = str(config.ports.stats)
        added[PROMETHEUS[2]] = names.STATS_PATH
    return added


def _annotate(
    pod: Mapping[str, Any],
    ann_in: Mapping[str, Any],
    added: dict[str, str],
    status: dict[str, Any],
    patch: Patch,
) -> dict[str, Any]:
    """Step 5: the new metadata, with ``added`` and last the status (which lists itself).

    Whether injection creates the metadata or its annotations goes into ``status["created"]``
    before the status is written.
    """
    meta_in = pod.get("metadata")
    created = status["created"]
    meta_was = "absent" if meta_in is None and "metadata" not in pod else _was(pod, "metadata")
    ann_was = "absent" if meta_was else _was(meta_in or {}, "annotations")
    if meta_was:
        created["metadata"] = meta_was
    elif ann_was:
        created["metadata.annotations"] = ann_was
    added[names.STATUS] = _to_json(status)

    if meta_was:
        meta = {"annotations": added}
        patch.add("/metadata", meta)
    elif ann_was:
        meta = {**(meta_in or {}), "annotations": added}
        patch.add("/metadata/annotations", added)
    else:
        meta = {**(meta_in or {}), "annotations": {**ann_in, **added}}
        for key, value in added.items():
            patch.add(ANNOTATION_PATHS[key], value)
    return meta


def _inject(
    pod: Mapping[str, Any],
    *,
    config: MeshConfig,
    bundle: str,
    ov: Overrides,
    app_ports: str,
    patch: Patch,
) -> dict[str, Any]:
    """The mutation steps of the module docstring, in order, on a shallow copy of ``pod``."""
    created: dict[str, str] = {}
    new = dict(pod)
    spec = dict(pod["spec"])
    new["spec"] = spec
    containers = list(spec["containers"])
    spec["containers"] = containers
    inits = list(spec.get("initContainers") or ())
    probes_orig: dict[str, Any] = {}
    handlers: dict[str, Any] = {}
    if ov.rewrite_probes:
        probes_orig, handlers = _rewrite_probes(containers, inits, config, patch)

    native = ov.native_sidecar
    hold = not native and ov.hold
    # CNI mode: the node's plugin installs the rules; the pod only checks they are there.
    init = validate_container(config, ov) if ov.cni else init_container(config, ov)
    proxy = proxy_container(
        config, ov, app_ports=app_ports, app_probes=_to_json(handlers), native=native, hold=hold
    )
    ours = [init, proxy] if native else [init]
    _add_init_containers(spec, ours, inits, created, patch)

    # 3. Classic mode: the proxy is an ordinary container, last (or first, holding the app).
    if not native:
        if hold:
            patch.add("/spec/containers/0", proxy)
            containers.insert(0, proxy)
        else:
            patch.add("/spec/containers/-", proxy)
            containers.append(proxy)
    _add_volumes(spec, created, patch)

    # 5. The status records what was added; _annotate completes "created" and writes it.
    ann_in = annotations_of(pod)
    added = _added_annotations(pod, ann_in, config, bundle, ov)
    status: dict[str, Any] = {
        "version": __version__,
        "initContainers": [c["name"] for c in ours],
        "containers": [] if native else [names.PROXY_CONTAINER],
        "volumes": list(SIDEMESH_VOLUMES),
        "annotations": [*added, names.STATUS],
        "created": created,
        "probes": probes_orig,
    }
    new["metadata"] = _annotate(pod, ann_in, added, status, patch)
    return new


def uninject_pod(pod: Mapping[str, Any]) -> dict[str, Any]:
    """The pod as it was before injection (a copy of it when it was never injected)."""
    _check_shape(pod)
    if not is_injected(pod):
        return dict(pod)
    return uninject(pod, Patch())


def inject_pod(
    pod: Mapping[str, Any], *, namespace: str, config: MeshConfig, bundle: str
) -> Injection:
    """Decide, then inject (or refresh an earlier injection). See the module docstring.

    Raises AnnotationError for a bad per-pod annotation and ConflictError for a pod that
    collides with what sidemesh adds; InjectionError for a pod that is not a pod.
    """
    _check_shape(pod)
    decision = decide(pod, namespace, config)
    if not decision.inject:
        return Injection(decision, dict(pod), [])
    patch = Patch()
    if is_injected(pod):
        base = uninject(pod, patch)
        if not base["spec"].get("containers"):
            raise InjectionError(
                "spec.containers holds only sidemesh's own containers: the pod has no "
                "application container to inject into"
            )
        ov = read_overrides(annotations_of(base), config)
        app_ports = check_conflicts(base, config)
        new = _inject(base, config=config, bundle=bundle, ov=ov, app_ports=app_ports, patch=patch)
        if new == pod:
            return Injection(Decision(False, ALREADY_INJECTED), dict(pod), [])
        return Injection(decision, new, patch.ops)
    ov = read_overrides(annotations_of(pod), config)
    app_ports = check_conflicts(pod, config)
    new = _inject(pod, config=config, bundle=bundle, ov=ov, app_ports=app_ports, patch=patch)
    return Injection(decision, new, patch.ops)
