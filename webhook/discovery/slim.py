"""Keep only what the control plane reads of each watched object (pure).

A Pod as the API server sends it is mostly fields the mesh never looks at — ``managedFields``,
every container's image, env, probes and mounts, the status' conditions and container
statuses, ``last-applied-configuration`` — and the control plane holds every Pod of the
cluster in memory. So each object is cut down, on arrival, to an allowlist per kind:

=============  ==================================================================================
kind           kept (besides kind, apiVersion and the metadata below)
=============  ==================================================================================
Namespace      —
Service        spec: type, clusterIP(s), ports, selector, externalName, ipFamilies,
               publishNotReadyAddresses, internalTrafficPolicy, trafficDistribution
EndpointSlice  addressType, ports; per endpoint: addresses, conditions, hostname, nodeName,
               zone, targetRef
Pod            spec: serviceAccountName, nodeName, hostNetwork, each container's (and init
               container's) name, ports and restartPolicy, and of the sidecar's environment
               the ``SIDEMESH_*`` settings (its inbound mode …) but not the app's probes;
               status: phase, podIP(s), hostIP
=============  ==================================================================================

Metadata keeps name, namespace, uid, resourceVersion, generation, deletionTimestamp, labels,
and the annotations of sidemesh's own domains (``sidemesh.io/…``, ``*.sidemesh.io/…``) except
the trust bundle (a PEM on every injected Pod, which the control plane has anyway).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from webhook import names

__all__ = ["KEEP_SPEC", "slim"]

#: Rule kinds: kept whole (spec and creationTimestamp); they are small and all of them is read.
KEEP_SPEC = frozenset(
    {"HTTPRoute", "GRPCRoute", "ReferenceGrant", "TrafficPolicy", "AccessPolicy", "RateLimitPolicy"}
)

_META = ("name", "namespace", "uid", "resourceVersion", "generation", "deletionTimestamp")
_SERVICE_SPEC = (
    "type",
    "clusterIP",
    "clusterIPs",
    "ports",
    "selector",
    "externalName",
    "ipFamilies",
    "publishNotReadyAddresses",
    "internalTrafficPolicy",
    "trafficDistribution",
)
_ENDPOINT = ("addresses", "conditions", "hostname", "nodeName", "zone", "targetRef")
_POD_SPEC = ("serviceAccountName", "nodeName", "hostNetwork")
_CONTAINER = ("name", "ports", "restartPolicy")
_POD_STATUS = ("phase", "podIP", "podIPs", "hostIP")


def _pick(obj: Mapping[str, Any] | None, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(obj, Mapping):
        return {}
    return {k: obj[k] for k in keys if k in obj}


def _container(c: Any) -> dict[str, Any]:
    out = _pick(c, _CONTAINER)
    if out.get("name") == names.PROXY_CONTAINER:
        env = [
            e
            for e in c.get("env") or ()
            if isinstance(e, Mapping)
            and str(e.get("name", "")).startswith("SIDEMESH_")
            and e.get("name") != names.ENV_APP_PROBES
        ]
        if env:
            out["env"] = env
    return out


def _ours(key: str) -> bool:
    domain = key.partition("/")[0] if "/" in key else ""
    return (domain == "sidemesh.io" or domain.endswith(".sidemesh.io")) and (
        key != names.TRUST_BUNDLE_ANNOTATION
    )


def _metadata(meta: Mapping[str, Any]) -> dict[str, Any]:
    out = _pick(meta, _META)
    if meta.get("labels"):
        out["labels"] = dict(meta["labels"])
    notes = {k: v for k, v in (meta.get("annotations") or {}).items() if _ours(k)}
    if notes:
        out["annotations"] = notes
    return out


def slim(kind: str, obj: Mapping[str, Any], api_version: str = "") -> dict[str, Any]:
    """``obj`` cut down to what the control plane reads (a new dict; ``obj`` is not changed).

    ``kind`` and ``api_version`` are set from the arguments when the object lacks them (the
    items of a list carry neither).
    """
    out: dict[str, Any] = {
        "kind": obj.get("kind") or kind,
        "apiVersion": obj.get("apiVersion") or api_version,
        "metadata": _metadata(obj.get("metadata") or {}),
    }
    if kind == "Service":
        out["spec"] = _pick(obj.get("spec"), _SERVICE_SPEC)
    elif kind == "EndpointSlice":
        out.update(_pick(obj, ("addressType", "ports")))
        out["endpoints"] = [_pick(e, _ENDPOINT) for e in obj.get("endpoints") or ()]
    elif kind in KEEP_SPEC:
        out["spec"] = obj.get("spec") or {}
        created = (obj.get("metadata") or {}).get("creationTimestamp")
        if created:  # rules of equal precedence: the older wins
            out["metadata"]["creationTimestamp"] = created
        if isinstance(obj.get("status"), Mapping):  # what the status writer compares with
            out["status"] = obj["status"]
    elif kind == "Pod":
        spec = obj.get("spec") or {}
        slim_spec = _pick(spec, _POD_SPEC)
        for key in ("initContainers", "containers"):
            if spec.get(key):
                slim_spec[key] = [_container(c) for c in spec[key]]
        out["spec"] = slim_spec
        out["status"] = _pick(obj.get("status"), _POD_STATUS)
    return out
