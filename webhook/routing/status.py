"""The ``status`` a rule object should carry, from the routing table's problems (pure).

HTTPRoute and GRPCRoute get the Gateway API's route status: one ``status.parents[]`` entry per
Service parent, written by controller :data:`CONTROLLER`, with two conditions —
``Accepted`` (False when the parent does not exist, has no such port, or the route is a
consumer route) and ``ResolvedRefs`` (False when a backend or mirror cannot be used; its share
of requests then gets 500). Entries of other controllers (a Gateway's) are kept as they are.
A TrafficPolicy gets ``status.conditions``: ``Accepted`` (False when its Service does not exist
or an older policy has it) and ``ResolvedRefs`` (False when a subset selects no endpoint).
Problems that leave only part of a rule out (a bad match or filter) are named in the
``Accepted`` message.

:func:`status_update` returns the new status only when it differs from the object's current
one, ignoring ``lastTransitionTime``, which is kept while a condition's status stays the same:
the control plane writes nothing when nothing changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from webhook.routing.api import GRPC_ROUTE, HTTP_ROUTE, TRAFFIC_POLICY, Problem
from webhook.routing.table import RoutingTable

__all__ = ["CONTROLLER", "STATUS_KINDS", "status_update"]

#: ``controllerName`` of the mesh's route status entries.
CONTROLLER: Final = "sidemesh.io/mesh"
STATUS_KINDS: Final = (HTTP_ROUTE, GRPC_ROUTE, TRAFFIC_POLICY)
_MAX_MESSAGE: Final = 1000


def _condition(kind: str, ok: bool, reason: str, message: str, generation: Any) -> dict[str, Any]:
    cond: dict[str, Any] = {
        "type": kind,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message[:_MAX_MESSAGE],
    }
    if isinstance(generation, int):
        cond["observedGeneration"] = generation
    return cond


def _text(problems: list[Problem]) -> str:
    return "; ".join(f"{p.field}: {p.message}" for p in problems)


def _is_ref(p: Problem) -> bool:
    return "backendRefs" in p.field or "requestMirror" in p.field


def _route_parents(obj: Mapping[str, Any], mine: list[Problem]) -> list[dict[str, Any]]:
    spec = obj.get("spec") or {}
    generation = (obj.get("metadata") or {}).get("generation")
    refs = [p for p in mine if _is_ref(p) and p.severity == "error"]
    other = [p for p in mine if not _is_ref(p) and not p.field.startswith("spec.parentRefs")]
    out = []
    for i, ref in enumerate(spec.get("parentRefs") or []):
        if not isinstance(ref, Mapping) or ref.get("kind") != "Service" or ref.get("group", "x"):
            continue  # a Gateway parent: its controller writes that entry
        where = f"spec.parentRefs[{i}]"
        bad_parent = [p for p in mine if p.field == where or p.field.startswith(where + ".")]
        if bad_parent:
            reason = (
                "UnsupportedValue" if "consumer" in bad_parent[0].message else "NoMatchingParent"
            )
            accepted = _condition("Accepted", False, reason, _text(bad_parent), generation)
        else:
            note = f"partly: {_text(other)}" if other else "attached to the Service"
            accepted = _condition("Accepted", True, "Accepted", note, generation)
        if refs:
            reason = _ref_reason(refs)
            resolved = _condition("ResolvedRefs", False, reason, _text(refs), generation)
        else:
            resolved = _condition("ResolvedRefs", True, "ResolvedRefs", "", generation)
        out.append(
            {
                "parentRef": dict(ref),
                "controllerName": CONTROLLER,
                "conditions": [accepted, resolved],
            }
        )
    return out


def _ref_reason(refs: list[Problem]) -> str:
    if any("ReferenceGrant" in p.message for p in refs):
        return "RefNotPermitted"
    if any("not supported" in p.message for p in refs):
        return "InvalidKind"
    return "BackendNotFound"


def _policy_conditions(obj: Mapping[str, Any], mine: list[Problem]) -> list[dict[str, Any]]:
    generation = (obj.get("metadata") or {}).get("generation")
    target = [p for p in mine if p.field.startswith("spec.targetRef")]
    subsets = [p for p in mine if p.field.startswith("spec.subsets") and p.severity == "warning"]
    other = [p for p in mine if p not in target and p not in subsets]
    if target:
        reason = "Conflicted" if "already has" in target[0].message else "TargetNotFound"
        accepted = _condition("Accepted", False, reason, _text(target), generation)
    else:
        note = f"partly: {_text(other)}" if other else "applied to the Service"
        accepted = _condition("Accepted", True, "Accepted", note, generation)
    if subsets:
        resolved = _condition("ResolvedRefs", False, "SubsetEmpty", _text(subsets), generation)
    else:
        resolved = _condition("ResolvedRefs", True, "ResolvedRefs", "", generation)
    return [accepted, resolved]


def _stamp(new: list[dict[str, Any]], old: Any, now: str) -> list[dict[str, Any]]:
    """Carry ``lastTransitionTime`` over from ``old`` when a condition's status is unchanged."""
    before = {c.get("type"): c for c in old or [] if isinstance(c, Mapping)}
    out = []
    for cond in new:
        prev = before.get(cond["type"])
        same = prev is not None and prev.get("status") == cond["status"]
        out.append(
            {
                **cond,
                "lastTransitionTime": prev.get("lastTransitionTime", now) if same and prev else now,
            }
        )
    return out


def _bare(status: Any) -> Any:
    """``status`` without transition times (what decides whether to write)."""
    if isinstance(status, Mapping):
        return {k: _bare(v) for k, v in status.items() if k != "lastTransitionTime"}
    if isinstance(status, list):
        return [_bare(v) for v in status]
    return status


def status_update(obj: Mapping[str, Any], table: RoutingTable, now: str) -> dict[str, Any] | None:
    """The status ``obj`` should have, or None when it has it already. ``now``: RFC 3339."""
    kind = obj.get("kind")
    meta = obj.get("metadata") or {}
    key = (kind, meta.get("namespace"), meta.get("name"))
    mine = [p for p in table.problems if (p.kind, p.namespace, p.name) == key]
    current = obj.get("status") if isinstance(obj.get("status"), Mapping) else {}
    assert isinstance(current, Mapping)
    if kind == TRAFFIC_POLICY:
        conditions = _stamp(_policy_conditions(obj, mine), current.get("conditions"), now)
        wanted: dict[str, Any] = {**current, "conditions": conditions}
    elif kind in (HTTP_ROUTE, GRPC_ROUTE):
        old = {
            _parent_key(e): e
            for e in current.get("parents") or []
            if isinstance(e, Mapping) and e.get("controllerName") == CONTROLLER
        }
        ours = []
        for entry in _route_parents(obj, mine):
            prev = old.get(_parent_key(entry), {})
            ours.append(
                {**entry, "conditions": _stamp(entry["conditions"], prev.get("conditions"), now)}
            )
        others = [
            e
            for e in current.get("parents") or []
            if isinstance(e, Mapping) and e.get("controllerName") != CONTROLLER
        ]
        wanted = {**current, "parents": [*others, *ours]}
    else:
        return None
    return None if _bare(wanted) == _bare(current) else wanted


def _parent_key(entry: Mapping[str, Any]) -> str:
    ref = entry.get("parentRef") or {}
    return f"{ref.get('namespace', '')}/{ref.get('name', '')}:{ref.get('port', '')}"
