"""The injection core: a pod in, the injected pod and its JSON patch out. Pure.

``inject_pod`` follows the decision (:mod:`webhook.inject.policy`), checks for conflicts, then runs
the mutation steps in order; each step changes a copy of the pod *and* records the RFC 6902
operation doing the same (:mod:`webhook.inject.patch`), so the patch is never computed by diffing:

1. probes of app containers (and user init containers) rewritten to the probe port,
2. ``sidemesh-init`` (and, native, ``sidemesh-proxy``) inserted first in ``initContainers``,
3. classic mode: ``sidemesh-proxy`` appended to ``containers`` (hold mode: inserted first),
4. the four volumes appended,
5. annotations: trust bundle, default container, Prometheus (unless the pod has its own), and
   last ``sidemesh.io/status``: a JSON record of exactly what was added, including the original
   probes and which fields did not exist, so :func:`uninject_pod` restores the pod exactly.

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
from webhook.errors import ConflictError, InjectionError
from webhook.inject.annotations import PROMETHEUS, Overrides, read_overrides
from webhook.inject.containers import (
    SIDEMESH_VOLUMES,
    init_args,
    init_container,
    proxy_container,
    validate_container,
    volumes,
)
from webhook.inject.patch import Patch, escape
from webhook.inject.policy import ALREADY_INJECTED, Decision, decide
from webhook.inject.probes import rewrite_container

__all__ = ["Injection", "inject_pod", "is_injected", "read_status", "uninject_pod"]

_OUR_CONTAINERS = frozenset({names.INIT_CONTAINER, names.PROXY_CONTAINER, names.VALIDATE_CONTAINER})
_OUR_VOLUMES = frozenset(SIDEMESH_VOLUMES)
# Annotations sidemesh may add (and so may remove again): never a user's.
_OUR_ANNOTATIONS = frozenset(
    {
        names.TRUST_BUNDLE_ANNOTATION,
        names.DEFAULT_CONTAINER,
        names.STATUS,
        names.CNI_CAPTURE,
        *PROMETHEUS,
    }
)
_ANNOTATIONS_PATH = "/metadata/annotations/"
_PROMETHEUS = frozenset(PROMETHEUS)
# Their patch paths, escaped once: every key has a "/" to escape, on every pod.
_ANNOTATION_PATHS = {key: _ANNOTATIONS_PATH + escape(key) for key in _OUR_ANNOTATIONS}
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


# Fields injection may create; the status says whether each was absent or null before.
_CREATABLE = ("metadata", "metadata.annotations", "spec.initContainers", "spec.volumes")


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


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _annotations(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = pod.get("metadata") or {}
    return meta.get("annotations") or {}


def is_injected(pod: Mapping[str, Any]) -> bool:
    """Whether the pod carries sidemesh's status annotation."""
    meta = pod.get("metadata")
    if not isinstance(meta, dict):
        return False
    annotations = meta.get("annotations")
    return isinstance(annotations, dict) and names.STATUS in annotations


def _status_error(why: str) -> InjectionError:
    return InjectionError(
        f"annotation {names.STATUS} was not written by this sidemesh ({why}); remove it, "
        "or re-create the workload from its un-injected manifest"
    )


def _str_list(status: Mapping[str, Any], key: str, allowed: frozenset[str]) -> list[str]:
    value = status.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _status_error(f"{key!r} is not a list of names")
    foreign = [v for v in value if v not in allowed]
    if foreign:
        # Never let a status annotation make us remove something that is not ours.
        raise _status_error(f"{key!r} names {', '.join(foreign)}, which sidemesh never adds")
    return value


def read_status(pod: Mapping[str, Any]) -> dict[str, Any]:
    """Parse and check the status annotation (InjectionError if it is not one of ours)."""
    raw = _annotations(pod).get(names.STATUS)
    if not isinstance(raw, str):
        raise _status_error("not a string")
    try:
        status = json.loads(raw)
    except ValueError:
        raise _status_error("not JSON") from None
    if not isinstance(status, dict) or not isinstance(status.get("version"), str):
        raise _status_error("no version")
    _str_list(status, "initContainers", _OUR_CONTAINERS)
    _str_list(status, "containers", _OUR_CONTAINERS)
    _str_list(status, "volumes", _OUR_VOLUMES)
    _str_list(status, "annotations", _OUR_ANNOTATIONS)
    created = status.get("created", {})
    if not isinstance(created, dict) or any(
        k not in _CREATABLE or v not in ("absent", "null") for k, v in created.items()
    ):
        raise _status_error("bad 'created'")
    probes = status.get("probes", {})
    if not isinstance(probes, dict) or not all(
        isinstance(p, dict) and all(k in names.PROBE_KINDS for k in p) for p in probes.values()
    ):
        raise _status_error("bad 'probes'")
    return status


# --- conflicts -------------------------------------------------------------------------------


def _check_conflicts(pod: Mapping[str, Any], config: MeshConfig) -> str:
    """Refuse a pod that collides with what sidemesh adds; else return its app ports.

    The app ports (``SIDEMESH_APP_PORTS``: the TCP ports of app containers, then of user
    sidecars, i.e. restartable init containers) come from the same pass over the ports.
    """
    spec = pod["spec"]
    app_ports: list[int] = []
    sidecar_ports: list[int] = []
    reserved = config.ports.all()
    px = config.proxy
    pod_sc = _dict(spec.get("securityContext"))
    for field in ("initContainers", "containers"):
        for c in spec.get(field) or ():
            name = c["name"]
            sidecar = c.get("restartPolicy") == "Always"
            # Where its TCP ports count as app ports (nowhere: a run-to-completion init).
            out = app_ports if field == "containers" else sidecar_ports if sidecar else None
            if name in _OUR_CONTAINERS:
                raise ConflictError(
                    f"spec.{field} already has a container named {name!r} but the pod has no "
                    f"{names.STATUS} annotation: rename it, or remove it and let sidemesh add "
                    "its own"
                )
            for port in c.get("ports") or ():
                if not isinstance(port, dict):
                    continue
                number = port.get("containerPort")
                if number in reserved:
                    raise ConflictError(
                        f"container {name!r} declares port {number}, which the sidemesh proxy "
                        f"reserves ({', '.join(map(str, sorted(reserved)))}): move the app off it, "
                        f"or opt the pod out with label {names.INJECT}=false"
                    )
                if (
                    out is not None
                    and isinstance(number, int)
                    and port.get("protocol", "TCP") == "TCP"
                    and number not in out
                ):
                    out.append(number)
            if field == "initContainers" and not sidecar:
                continue  # a run-to-completion init container may run as the proxy uid on purpose
            sc = _dict(c.get("securityContext"))
            if not sc and not pod_sc:
                continue  # the common case: no ids on the container nor the pod
            for key, ours in (("runAsUser", px.uid), ("runAsGroup", px.gid)):
                value = sc.get(key, pod_sc.get(key))
                if value == ours and not isinstance(value, bool):
                    raise ConflictError(
                        f"container {name!r} runs with {key} {ours}, the sidemesh proxy's id: "
                        "its traffic would bypass the proxy; choose another id"
                    )
    for v in spec.get("volumes") or ():
        if v["name"] in _OUR_VOLUMES:
            raise ConflictError(
                f"spec.volumes already has a volume named {v['name']!r} but the pod has no "
                f"{names.STATUS} annotation: rename it"
            )
    for key in (names.TRUST_BUNDLE_ANNOTATION, names.CNI_CAPTURE):
        if key in _annotations(pod):
            raise ConflictError(
                f"the pod already has annotation {key} but no "
                f"{names.STATUS} annotation: remove it, sidemesh sets it"
            )
    app_ports += [p for p in sidecar_ports if p not in app_ports]
    return ",".join(map(str, app_ports))


# --- inject ----------------------------------------------------------------------------------


def _was(container: Mapping[str, Any], key: str) -> str | None:
    """'absent' / 'null' when ``key`` must be created; None when it is already there."""
    if key not in container:
        return "absent"
    return "null" if container[key] is None else None


def _inject(
    pod: Mapping[str, Any],
    *,
    config: MeshConfig,
    bundle: str,
    ov: Overrides,
    app_ports: str,
    patch: Patch,
) -> dict[str, Any]:
    status: dict[str, Any] = {"version": __version__}
    created: dict[str, str] = {}
    probes_orig: dict[str, Any] = {}
    new = dict(pod)
    spec = dict(pod["spec"])
    new["spec"] = spec
    containers = list(spec["containers"])
    spec["containers"] = containers
    inits_in = spec.get("initContainers")
    inits = list(inits_in or ())

    # 1. Probes, at the indices of the input (before anything is inserted).
    handlers: dict[str, Any] = {}
    if ov.rewrite_probes:
        for field, items in (("containers", containers), ("initContainers", inits)):
            for i, c in enumerate(items):
                rw = rewrite_container(c, config.ports.probes)
                if rw is None:
                    continue
                items[i] = {**c, **rw.probes}
                at = f"/spec/{field}/{i}/"
                for kind, probe in rw.probes.items():
                    patch.replace(at + kind, probe)
                probes_orig[c["name"]] = rw.originals
                handlers.update(rw.handlers)

    native = ov.native_sidecar
    hold = not native and ov.hold
    # CNI mode: the node's plugin installs the rules; the pod only checks they are there.
    init = validate_container(config, ov) if ov.cni else init_container(config, ov)
    proxy = proxy_container(
        config,
        ov,
        app_ports=app_ports,
        app_probes=_to_json(handlers),
        native=native,
        hold=hold,
    )

    # 2. Our init containers go first: capture rules, then (native) the proxy, then the user's.
    ours = [init, proxy] if native else [init]
    was = _was(spec, "initContainers")
    if was:
        created["spec.initContainers"] = was
        patch.add("/spec/initContainers", list(ours))
    else:
        for k, c in enumerate(ours):
            patch.add(f"/spec/initContainers/{k}", c)
    spec["initContainers"] = ours + inits
    status["initContainers"] = [c["name"] for c in ours]

    # 3. Classic mode: the proxy is an ordinary container, last (or first, holding the app).
    if native:
        status["containers"] = []
    else:
        if hold:
            patch.add("/spec/containers/0", proxy)
            containers.insert(0, proxy)
        else:
            patch.add("/spec/containers/-", proxy)
            containers.append(proxy)
        status["containers"] = [names.PROXY_CONTAINER]

    # 4. Volumes, appended.
    ours_v = volumes()
    was = _was(spec, "volumes")
    if was:
        created["spec.volumes"] = was
        patch.add("/spec/volumes", list(ours_v))
        spec["volumes"] = ours_v
    else:
        for v in ours_v:
            patch.add("/spec/volumes/-", v)
        spec["volumes"] = [*spec["volumes"], *ours_v]
    status["volumes"] = list(SIDEMESH_VOLUMES)

    # 5. Annotations; the status (which lists itself) last.
    meta_in = pod.get("metadata")
    ann_in = _annotations(pod)
    added: dict[str, str] = {names.TRUST_BUNDLE_ANNOTATION: bundle}
    if ov.cni:
        added[names.CNI_CAPTURE] = _to_json(init_args(config, ov))
    if names.DEFAULT_CONTAINER not in ann_in:
        added[names.DEFAULT_CONTAINER] = pod["spec"]["containers"][0]["name"]
    if _PROMETHEUS.isdisjoint(ann_in):
        added[PROMETHEUS[0]] = "true"
        added[PROMETHEUS[1]] = str(config.ports.stats)
        added[PROMETHEUS[2]] = names.STATS_PATH
    status["annotations"] = [*added, names.STATUS]
    meta_was = "absent" if meta_in is None and "metadata" not in pod else _was(pod, "metadata")
    ann_was = "absent" if meta_was else _was(meta_in or {}, "annotations")
    if meta_was:
        created["metadata"] = meta_was
    elif ann_was:
        created["metadata.annotations"] = ann_was
    status["created"] = created
    status["probes"] = probes_orig
    added[names.STATUS] = _to_json(status)

    if meta_was:
        new["metadata"] = {"annotations": added}
        patch.add("/metadata", new["metadata"])
    elif ann_was:
        new["metadata"] = {**(meta_in or {}), "annotations": added}
        patch.add("/metadata/annotations", added)
    else:
        new["metadata"] = {**(meta_in or {}), "annotations": {**ann_in, **added}}
        for key, value in added.items():
            patch.add(_ANNOTATION_PATHS[key], value)
    return new


# --- uninject --------------------------------------------------------------------------------


def _restore_field(parent: dict[str, Any], key: str, how: str, path: str, patch: Patch) -> None:
    if how == "absent":
        del parent[key]
        patch.remove(path)
    else:
        parent[key] = None
        patch.replace(path, None)


def _uninject(pod: Mapping[str, Any], patch: Patch) -> dict[str, Any]:
    status = read_status(pod)
    created: dict[str, str] = status.get("created", {})
    probes: dict[str, Any] = status.get("probes", {})
    new = dict(pod)
    spec = dict(pod["spec"])
    new["spec"] = spec

    # Original probes back first, while the indices are still those of the injected pod.
    for field in ("containers", "initContainers"):
        if not isinstance(spec.get(field), list):
            continue
        items = spec[field] = list(spec[field])
        for i, c in enumerate(items):
            originals = probes.get(c["name"])
            if not originals:
                continue
            for kind, probe in originals.items():
                path = f"/spec/{field}/{i}/{kind}"
                if kind in c:
                    patch.replace(path, probe)
                else:
                    patch.add(path, probe)
            items[i] = {**c, **originals}

    # Remove what we added, by name, from the end so the indices stay valid.
    for field, ours in (
        ("initContainers", set(status.get("initContainers", ()))),
        ("containers", set(status.get("containers", ()))),
        ("volumes", set(status.get("volumes", ()))),
    ):
        current = spec.get(field)
        if not isinstance(current, list):
            continue
        items = spec[field] = list(current)
        for i in range(len(items) - 1, -1, -1):
            if items[i].get("name") in ours:
                del items[i]
                patch.remove(f"/spec/{field}/{i}")
        how = created.get(f"spec.{field}")
        if how and not items:
            _restore_field(spec, field, how, f"/spec/{field}", patch)

    meta = dict(pod["metadata"])
    new["metadata"] = meta
    ann = meta["annotations"] = dict(meta["annotations"])
    for key in status.get("annotations", ()):
        if key in ann:
            del ann[key]
            patch.remove(_ANNOTATIONS_PATH + escape(key))
    how = created.get("metadata.annotations")
    if how and not ann:
        _restore_field(meta, "annotations", how, "/metadata/annotations", patch)
    how = created.get("metadata")
    if how and not meta.get("annotations"):
        if "annotations" in meta and not meta["annotations"]:
            del meta["annotations"]
            patch.remove("/metadata/annotations")
        if not meta:
            _restore_field(new, "metadata", how, "/metadata", patch)
    return new


def uninject_pod(pod: Mapping[str, Any]) -> dict[str, Any]:
    """The pod as it was before injection (a copy of it when it was never injected)."""
    _check_shape(pod)
    if not is_injected(pod):
        return dict(pod)
    return _uninject(pod, Patch())


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
        base = _uninject(pod, patch)
        if not base["spec"].get("containers"):
            raise InjectionError(
                "spec.containers holds only sidemesh's own containers: the pod has no "
                "application container to inject into"
            )
        ov = read_overrides(_annotations(base), config)
        app_ports = _check_conflicts(base, config)
        new = _inject(base, config=config, bundle=bundle, ov=ov, app_ports=app_ports, patch=patch)
        if new == pod:
            return Injection(Decision(False, ALREADY_INJECTED), dict(pod), [])
        return Injection(decision, new, patch.ops)
    ov = read_overrides(_annotations(pod), config)
    app_ports = _check_conflicts(pod, config)
    new = _inject(pod, config=config, bundle=bundle, ov=ov, app_ports=app_ports, patch=patch)
    return Injection(decision, new, patch.ops)
