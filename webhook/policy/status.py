"""The ``status`` an AccessPolicy or RateLimitPolicy should carry. Pure.

Two conditions in ``status.conditions``, written by the control plane with the traffic rules'
status writer (:mod:`webhook.routing.statuswriter`):

- ``Accepted``: True (reason ``Accepted``) when the sidecars enforce the policy; False with
  reason ``Invalid`` when it cannot be parsed (the message names the field), or
  ``NoRateLimitService`` for Global limits without a rate-limit service;
- ``ResolvedRefs``: False (reason ``RefNotFound``) while a reference resolves to nothing — a
  selector that selects no pod, a service account no pod runs as, a namespace without pods —
  which is allowed (they may come later) but usually a typo; True otherwise.

Like the rules' status, a new status is returned only when it differs from the object's
(``lastTransitionTime`` kept while a condition's status stays the same).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from webhook.discovery.model import MeshModel
from webhook.policy.model import KIND as ACCESS_POLICY, AccessPolicy
from webhook.policy.report import unresolved
from webhook.ratelimit.model import KIND as RATE_LIMIT_POLICY, RateLimitPolicy
from webhook.routing.status import _bare, _condition, _stamp

__all__ = ["POLICY_STATUS_KINDS", "policy_status_update"]

POLICY_STATUS_KINDS: Final = (ACCESS_POLICY, RATE_LIMIT_POLICY)


def _conditions(
    obj: Mapping[str, Any],
    parsed: AccessPolicy | RateLimitPolicy | None,
    error: str | None,
    model: MeshModel,
    root: str,
) -> list[dict[str, Any]]:
    generation = (obj.get("metadata") or {}).get("generation")
    if parsed is None:
        return [_condition("Accepted", False, "Invalid", error or "not parsed", generation)]
    if error:
        accepted = _condition("Accepted", False, "NoRateLimitService", error, generation)
    else:
        accepted = _condition("Accepted", True, "Accepted", "enforced by the sidecars", generation)
    missing = unresolved(parsed, model, root)
    if missing:
        text = "; ".join(f"{field}: {message}" for field, message in missing)
        resolved = _condition("ResolvedRefs", False, "RefNotFound", text, generation)
    else:
        resolved = _condition("ResolvedRefs", True, "ResolvedRefs", "", generation)
    return [accepted, resolved]


def policy_status_update(
    obj: Mapping[str, Any],
    policies: Iterable[AccessPolicy | RateLimitPolicy],
    errors: Mapping[str, str],
    model: MeshModel,
    root: str,
    now: str,
) -> dict[str, Any] | None:
    """The status ``obj`` should have, or None when it has it already. ``policies``: those
    that parsed; ``errors``: ``"<Kind> ns/name"`` → why one is not (fully) enforced."""
    kind = obj.get("kind")
    meta = obj.get("metadata") or {}
    ident = f"{meta.get('namespace')}/{meta.get('name')}"
    parsed = next(
        (p for p in policies if type(p).__name__ == kind and p.id == ident),
        None,
    )
    conditions = _conditions(obj, parsed, errors.get(f"{kind} {ident}"), model, root)
    current = obj.get("status") if isinstance(obj.get("status"), Mapping) else {}
    assert isinstance(current, Mapping)
    wanted = {**current, "conditions": _stamp(conditions, current.get("conditions"), now)}
    return None if _bare(wanted) == _bare(current) else wanted
