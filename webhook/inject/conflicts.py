"""Conflicts between a pod and what sidemesh adds to it, found before anything changes. Pure.

A pod that is not injected yet must not already have a container or volume with one of
sidemesh's names, an annotation sidemesh sets, a port the proxy reserves, or an app (or user
sidecar) running as the proxy's uid or gid — its traffic would bypass the capture rules. Each
refusal is a :class:`~webhook.errors.ConflictError` naming the field, the value and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from webhook import names
from webhook.config import MeshConfig, ProxyConfig
from webhook.errors import ConflictError
from webhook.inject.uninject import OUR_CONTAINERS, OUR_VOLUMES, annotations_of

__all__ = ["check_conflicts"]


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def check_conflicts(pod: Mapping[str, Any], config: MeshConfig) -> str:
    """Refuse a pod that collides with what sidemesh adds; else return its app ports.

    The app ports (``SIDEMESH_APP_PORTS``: the TCP ports of app containers, then of user
    sidecars, i.e. restartable init containers) come from the same pass over the ports.
    """
    spec = pod["spec"]
    app_ports: list[int] = []
    sidecar_ports: list[int] = []
    reserved = config.ports.all()
    pod_sc = _dict(spec.get("securityContext"))
    for field in ("initContainers", "containers"):
        for c in spec.get(field) or ():
            name = c["name"]
            sidecar = c.get("restartPolicy") == "Always"
            # Where its TCP ports count as app ports (nowhere: a run-to-completion init).
            out = app_ports if field == "containers" else sidecar_ports if sidecar else None
            if name in OUR_CONTAINERS:
                raise ConflictError(
                    f"spec.{field} already has a container named {name!r} but the pod has no "
                    f"{names.STATUS} annotation: rename it, or remove it and let sidemesh add "
                    "its own"
                )
            _check_ports(c, reserved, out)
            # A run-to-completion init container may run as the proxy uid on purpose; the
            # common case has no ids on the container nor the pod, and needs no call.
            if (field == "containers" or sidecar) and (pod_sc or c.get("securityContext")):
                _check_ids(c, pod_sc, config.proxy)
    _check_volumes_and_annotations(pod)
    app_ports += [p for p in sidecar_ports if p not in app_ports]
    return ",".join(map(str, app_ports))


def _check_ports(c: Mapping[str, Any], reserved: tuple[int, ...], out: list[int] | None) -> None:
    """Refuse a port the proxy reserves; append the container's new TCP ports to ``out``."""
    for port in c.get("ports") or ():
        if not isinstance(port, dict):
            continue
        number = port.get("containerPort")
        if number in reserved:
            raise ConflictError(
                f"container {c['name']!r} declares port {number}, which the sidemesh proxy "
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


def _check_ids(c: Mapping[str, Any], pod_sc: Mapping[str, Any], px: ProxyConfig) -> None:
    """Refuse a container running as the proxy's uid or gid (its own or the pod's setting)."""
    sc = _dict(c.get("securityContext"))
    for key, ours in (("runAsUser", px.uid), ("runAsGroup", px.gid)):
        value = sc.get(key, pod_sc.get(key))
        if value == ours and not isinstance(value, bool):
            raise ConflictError(
                f"container {c['name']!r} runs with {key} {ours}, the sidemesh proxy's id: "
                "its traffic would bypass the proxy; choose another id"
            )


def _check_volumes_and_annotations(pod: Mapping[str, Any]) -> None:
    for v in pod["spec"].get("volumes") or ():
        if v["name"] in OUR_VOLUMES:
            raise ConflictError(
                f"spec.volumes already has a volume named {v['name']!r} but the pod has no "
                f"{names.STATUS} annotation: rename it"
            )
    annotations = annotations_of(pod)
    for key in (names.TRUST_BUNDLE_ANNOTATION, names.CNI_CAPTURE):
        if key in annotations:
            raise ConflictError(
                f"the pod already has annotation {key} but no "
                f"{names.STATUS} annotation: remove it, sidemesh sets it"
            )
