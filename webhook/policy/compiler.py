"""Access policies → the RBAC filter configs of one workload's inbound side (Envoy JSON dicts).

Pure. Every inbound chain of a sidecar under discovery carries two RBAC filters, each
delivered by extension config discovery (ECDS) under a fixed name, so a policy change replaces
two small resources and never the listener (its connections are not drained):

==========================  =====================================================================
``sidemesh.authz.*.deny``   RBAC action DENY with the DENY policies; the AUDIT policies are its
                            shadow rules (counted and logged as ``shadow_denied``, never enforced)
``sidemesh.authz.*.allow``  RBAC action ALLOW with the ALLOW policies, present only when at least
                            one ALLOW policy selects the workload (else the filter passes all)
==========================  =====================================================================

``*`` is ``http`` (the connection managers of the mTLS HTTP/1 and h2 chains and of PERMISSIVE
plaintext HTTP) or ``tcp`` (network RBAC before the TCP proxy of the TCP chains). One RBAC policy
per rule, named after the AccessPolicy (``ns/name``, ``ns/name#2`` for its second rule …): the
name is what Envoy's per-rule stats, the 403 body and the audit log show.

The principal is the verified peer certificate's URI SAN (``authenticated.principal_name``): a
header can never make a caller someone else. A plaintext connection has no principal, so only
``unauthenticated`` sources (and rules without sources) match it.

TCP has no path, method or header: on TCP chains an ALLOW rule that needs one is left out (it
admits nothing there), a DENY or AUDIT rule keeps only its sources and ports (it denies more,
never less).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from webhook import names
from webhook.policy.model import AccessPolicy, Operation, Rule, Source

__all__ = [
    "ECDS_NAMES",
    "HTTP_RBAC",
    "TCP_RBAC",
    "WorkloadAuthz",
    "compile_workload",
    "policies_for",
    "rule_ids",
]

HTTP_RBAC: Final = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
TCP_RBAC: Final = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"
#: The ECDS resource names, in the order the filters run.
ECDS_NAMES: Final = {
    "http": ("sidemesh.authz.http.deny", "sidemesh.authz.http.allow"),
    "tcp": ("sidemesh.authz.tcp.deny", "sidemesh.authz.tcp.allow"),
}
Layer = Literal["http", "tcp"]


@dataclass(frozen=True)
class WorkloadAuthz:
    """What one workload enforces: the policies that select it and its four filter configs
    (ECDS name → the filter's typed config)."""

    policies: tuple[AccessPolicy, ...]
    filters: Mapping[str, Mapping[str, Any]]


def policies_for(
    policies: Iterable[AccessPolicy],
    namespace: str,
    labels: Mapping[str, str],
    root_namespace: str,
) -> tuple[AccessPolicy, ...]:
    return tuple(p for p in policies if p.selects(namespace, labels, root_namespace))


def rule_ids(policy: AccessPolicy) -> list[str]:
    """The RBAC policy name of each rule of ``policy``."""
    if len(policy.rules) == 1:
        return [policy.id]
    return [f"{policy.id}#{i}" for i in range(1, len(policy.rules) + 1)]


def compile_workload(selected: Iterable[AccessPolicy], trust_domain: str) -> WorkloadAuthz:
    selected = tuple(selected)
    filters: dict[str, Mapping[str, Any]] = {}
    for layer in ("http", "tcp"):
        deny_name, allow_name = ECDS_NAMES[layer]
        deny = _rbac(selected, "DENY", layer, trust_domain)
        audit = _rbac(selected, "AUDIT", layer, trust_domain)
        allow = _rbac(selected, "ALLOW", layer, trust_domain)
        filters[deny_name] = _filter(layer, "deny", deny, audit)
        filters[allow_name] = _filter(layer, "allow", allow, None)
    return WorkloadAuthz(selected, filters)


def _filter(
    layer: Layer, role: str, rules: dict[str, Any] | None, shadow: dict[str, Any] | None
) -> dict[str, Any]:
    config: dict[str, Any] = {"@type": HTTP_RBAC if layer == "http" else TCP_RBAC}
    if layer == "http":
        config["rules_stat_prefix"] = f"{role}."
        # <hcm>.rbac.<role>.policy.<ns/name>.allowed|denied: a counter per policy rule.
        config["track_per_rule_stats"] = True
    else:
        config["stat_prefix"] = f"authz_{role}."
    if rules is not None:
        config["rules"] = rules
    if shadow is not None:
        config["shadow_rules"] = shadow
        config["shadow_rules_stat_prefix"] = "audit."
    return config


def _rbac(
    selected: tuple[AccessPolicy, ...], action: str, layer: Layer, trust_domain: str
) -> dict[str, Any] | None:
    mine = [p for p in selected if p.action == action]
    if not mine:
        return None
    policies: dict[str, Any] = {}
    for policy in mine:
        for rule, rule_id in zip(policy.rules, rule_ids(policy), strict=True):
            compiled = _rule(rule, layer, action, trust_domain)
            if compiled is not None:
                policies[rule_id] = compiled
    # Denials (and AUDIT matches) are logged by the chain's access log (webhook.policy.envoy).
    return {"action": "ALLOW" if action == "ALLOW" else "DENY", "policies": policies}


def _rule(rule: Rule, layer: Layer, action: str, trust_domain: str) -> dict[str, Any] | None:
    op = rule.to
    if layer == "tcp" and op.http_only:
        if action == "ALLOW":
            return None
        op = Operation(ports=op.ports)
    principals = [_principal(s, trust_domain) for s in rule.sources] or [{"any": True}]
    return {"permissions": [_permission(op)], "principals": principals}


def _principal(source: Source, trust_domain: str) -> dict[str, Any]:
    if source.kind == "authenticated":
        return {"authenticated": {}}
    if source.kind == "unauthenticated":
        return {"not_id": {"authenticated": {}}}
    if source.kind == "principal":
        value = source.value
        match = {"prefix": value[:-1]} if value.endswith("*") else {"exact": value}
    elif source.kind == "serviceAccount":
        ns, sa = source.value.split("/", 1)
        match = {"exact": names.spiffe_id(trust_domain, ns, sa)}
    else:
        match = {"prefix": f"{names.trust_domain_prefix(trust_domain)}ns/{source.value}/sa/"}
    return {"authenticated": {"principal_name": match}}


def _any_of(items: list[dict[str, Any]]) -> dict[str, Any]:
    return items[0] if len(items) == 1 else {"or_rules": {"rules": items}}


def _path(pattern: str) -> dict[str, Any]:
    if pattern == "*":
        return {"any": True}
    if pattern.endswith("*"):
        match = {"prefix": pattern[:-1]}
    elif pattern.startswith("*"):
        match = {"suffix": pattern[1:]}
    else:
        match = {"exact": pattern}
    return {"url_path": {"path": match}}


def _header(name: str, value: str) -> dict[str, Any]:
    if value == "*":
        return {"header": {"name": name, "present_match": True}}
    return {"header": {"name": name, "string_match": {"exact": value}}}


def _permission(op: Operation) -> dict[str, Any]:
    parts: list[dict[str, Any]] = []
    if op.ports:
        parts.append(_any_of([{"destination_port": p} for p in op.ports]))
    if op.paths:
        parts.append(_any_of([_path(p) for p in op.paths]))
    if op.methods:
        parts.append(_any_of([_header(":method", m) for m in op.methods]))
    parts += [_header(name, value) for name, value in op.headers]
    if not parts:
        return {"any": True}
    return parts[0] if len(parts) == 1 else {"and_rules": {"rules": parts}}
