"""What the rate-limit service knows of its own: every Global limit and who may spend it. Pure.

The service reads the RateLimitPolicy objects (and the Pods they select) from the same source
the control plane reads, so a descriptor only *names* a limit; its size comes from here. A
``limit`` entry in a request is ignored: a sidecar cannot raise its own budget.

Who may spend a limit: the sidecars of the workloads the policy selects, i.e. a caller whose
verified certificate is the SPIFFE id of a service account some selected Pod runs as. A
sidecar's descriptors are about its own inbound traffic, so any other caller asking about
that limit is answered OK without counting (it can neither spend nor learn another
workload's budget; :data:`FOREIGN`). A descriptor naming no Global limit the service knows
(a policy that was just deleted or not yet seen, a Local limit, garbage) is answered OK
without counting too (:data:`UNKNOWN`): limits are enforced from the moment both the sidecar
and the service see the policy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from webhook import names
from webhook.ratelimit.model import RateLimitPolicy, parse_limit_policies

__all__ = [
    "COUNTED_KEYS",
    "FOREIGN",
    "UNKNOWN",
    "KnownLimit",
    "LimitTable",
    "build_table",
    "judge",
]

#: Why a descriptor was not counted (a metric label).
UNKNOWN: Final = "unknown_limit"
FOREIGN: Final = "not_the_callers_workload"
#: The descriptor entries a counter is keyed by; any other entry (``limit``) is ignored.
COUNTED_KEYS: Final = ("policy", "caller", "match")


@dataclass(frozen=True)
class KnownLimit:
    limit_id: str
    requests: int
    per: str
    #: SPIFFE ids of the service accounts the selected Pods run as.
    callers: frozenset[str]


@dataclass(frozen=True)
class LimitTable:
    limits: Mapping[str, KnownLimit]
    #: Policies that did not parse: ``ns/name`` → why.
    errors: Mapping[str, str]


def build_table(
    policy_objects: Iterable[Mapping[str, Any]],
    pod_objects: Iterable[Mapping[str, Any]],
    trust_domain: str,
) -> LimitTable:
    policies, errors = parse_limit_policies(policy_objects)
    pods = [p for p in (_pod(o) for o in pod_objects) if p is not None]
    limits: dict[str, KnownLimit] = {}
    for policy in policies:
        callers = _callers(policy, pods, trust_domain)
        for limit_id, limit in zip(policy.limit_ids(), policy.limits, strict=True):
            if limit.scope == "Global":
                limits[limit_id] = KnownLimit(limit_id, limit.requests, limit.per, callers)
    return LimitTable(limits, errors)


def judge(
    table: LimitTable, caller: str | None, entries: Sequence[tuple[str, str]]
) -> tuple[KnownLimit | None, tuple[tuple[str, str], ...], str]:
    """``(limit, counted entries, "")`` for a descriptor to count, else ``(None, (), why)``."""
    values = dict(entries)
    known = table.limits.get(values.get("policy", ""))
    if known is None:
        return None, (), UNKNOWN
    if caller is None or caller not in known.callers:
        return None, (), FOREIGN
    counted = tuple((k, values[k]) for k in COUNTED_KEYS if k in values)
    return known, counted, ""


def _callers(
    policy: RateLimitPolicy, pods: list[tuple[str, Mapping[str, str], str]], trust_domain: str
) -> frozenset[str]:
    out = set()
    for namespace, labels, service_account in pods:
        if policy.selects(namespace, labels):
            try:
                out.add(names.spiffe_id(trust_domain, namespace, service_account))
            except ValueError:
                continue  # not a name Kubernetes would accept: no certificate carries it
    return frozenset(out)


def _pod(obj: Mapping[str, Any]) -> tuple[str, Mapping[str, str], str] | None:
    meta = obj.get("metadata")
    spec = obj.get("spec")
    status = obj.get("status")
    if not isinstance(meta, Mapping) or not isinstance(spec, Mapping):
        return None
    if isinstance(status, Mapping) and status.get("phase") in ("Succeeded", "Failed"):
        return None
    labels = meta.get("labels")
    label_map = {str(k): str(v) for k, v in labels.items()} if isinstance(labels, Mapping) else {}
    sa = spec.get("serviceAccountName") or names.DEFAULT_SERVICE_ACCOUNT
    return str(meta.get("namespace") or ""), label_map, str(sa)
