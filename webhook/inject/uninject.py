"""Undoing an injection: the status annotation read and checked, then exactly what it lists
removed. Pure.

``sidemesh.io/status`` records what injection added (containers, volumes, annotations by
name), the original probes it rewrote and which fields did not exist before. Uninjection
trusts it only after checking that every name in it is one sidemesh adds, so a forged or
foreign status can never make it remove a user's container.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from webhook import names
from webhook.errors import InjectionError
from webhook.inject.annotations import PROMETHEUS
from webhook.inject.containers import SIDEMESH_VOLUMES
from webhook.inject.patch import Patch, escape

__all__ = [
    "ANNOTATION_PATHS",
    "CREATABLE",
    "OUR_CONTAINERS",
    "OUR_VOLUMES",
    "annotations_of",
    "is_injected",
    "read_status",
    "uninject",
]

OUR_CONTAINERS = frozenset({names.INIT_CONTAINER, names.PROXY_CONTAINER, names.VALIDATE_CONTAINER})
OUR_VOLUMES = frozenset(SIDEMESH_VOLUMES)
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
# Their patch paths, escaped once: every key has a "/" to escape, on every pod.
ANNOTATION_PATHS = {key: "/metadata/annotations/" + escape(key) for key in _OUR_ANNOTATIONS}
# Fields injection may create; the status says whether each was absent or null before.
CREATABLE = ("metadata", "metadata.annotations", "spec.initContainers", "spec.volumes")


def annotations_of(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    """The pod's annotations, empty when it has none (the shape is checked before)."""
    meta = pod.get("metadata") or {}
    return meta.get("annotations") or {}


def is_injected(pod: Mapping[str, Any]) -> bool:
    """Whether the pod carries sidemesh's status annotation."""
    meta = pod.get("metadata")
    if not isinstance(meta, dict):
        return False
    annotations = meta.get("annotations")
    return isinstance(annotations, dict) and names.STATUS in annotations


# --- reading the status ----------------------------------------------------------------------


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
    raw = annotations_of(pod).get(names.STATUS)
    if not isinstance(raw, str):
        raise _status_error("not a string")
    try:
        status = json.loads(raw)
    except ValueError:
        raise _status_error("not JSON") from None
    if not isinstance(status, dict) or not isinstance(status.get("version"), str):
        raise _status_error("no version")
    _str_list(status, "initContainers", OUR_CONTAINERS)
    _str_list(status, "containers", OUR_CONTAINERS)
    _str_list(status, "volumes", OUR_VOLUMES)
    _str_list(status, "annotations", _OUR_ANNOTATIONS)
    created = status.get("created", {})
    if not isinstance(created, dict) or any(
        k not in CREATABLE or v not in ("absent", "null") for k, v in created.items()
    ):
        raise _status_error("bad 'created'")
    probes = status.get("probes", {})
    if not isinstance(probes, dict) or not all(
        isinstance(p, dict) and all(k in names.PROBE_KINDS for k in p) for p in probes.values()
    ):
        raise _status_error("bad 'probes'")
    return status


# --- undoing ---------------------------------------------------------------------------------


def _restore_field(parent: dict[str, Any], key: str, how: str, path: str, patch: Patch) -> None:
    if how == "absent":
        del parent[key]
        patch.remove(path)
    else:
        parent[key] = None
        patch.replace(path, None)


def _restore_probes(spec: dict[str, Any], probes: Mapping[str, Any], patch: Patch) -> None:
    """Original probes back, while the indices are still those of the injected pod."""
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


def _remove_items(spec: dict[str, Any], status: Mapping[str, Any], patch: Patch) -> None:
    """Remove the containers and volumes we added, by name, from the end so the indices stay
    valid; a list injection created goes again once empty."""
    created: Mapping[str, str] = status.get("created", {})
    for field in ("initContainers", "containers", "volumes"):
        ours = set(status.get(field, ()))
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


def _remove_annotations(
    pod: Mapping[str, Any], new: dict[str, Any], status: Mapping[str, Any], patch: Patch
) -> None:
    """Remove our annotations; the annotations map and metadata go too if injection made them."""
    created: Mapping[str, str] = status.get("created", {})
    meta = dict(pod["metadata"])
    new["metadata"] = meta
    ann = meta["annotations"] = dict(meta["annotations"])
    for key in status.get("annotations", ()):
        if key in ann:
            del ann[key]
            patch.remove(ANNOTATION_PATHS[key])
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


def uninject(pod: Mapping[str, Any], patch: Patch) -> dict[str, Any]:
    """The injected ``pod`` as it was before injection; ``patch`` gets the operations.

    The pod's shape must have been checked; its status is checked here (InjectionError).
    Copies are shallow along the changed paths only, as for injection.
    """
    status = read_status(pod)
    new = dict(pod)
    spec = dict(pod["spec"])
    new["spec"] = spec
    _restore_probes(spec, status.get("probes", {}), patch)
    _remove_items(spec, status, patch)
    _remove_annotations(pod, new, status, patch)
    return new
