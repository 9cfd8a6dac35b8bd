"""The TCP gate: a workload's TCP access policy decided when the connection is established,
before anything reaches the app. Pure.

Network RBAC decides on a connection's first bytes from the caller. By then the TCP proxy has
connected to the app, and a server-first app (SMTP, MySQL, SSH …) has already sent its greeting
to a caller the policy denies. The gate moves that decision to the moment the caller's TLS
handshake completes (at once on a plaintext connection):

- every inbound TCP proxy connects to the app only after the downstream handshake
  (``upstream_connect_mode: ON_DOWNSTREAM_TLS_HANDSHAKE``), when the peer certificate is known;
- before that, a ``set_filter_state`` network filter (delivered by ECDS as
  ``sidemesh.authz.tcp.gate``) evaluates the same rules as the workload's two network RBAC
  filters, compiled to one CEL expression over the verified peer certificate and the
  destination port. It names the deciding policy in the connection's filter state
  (``sidemesh.authz.tcp.denied``: ``ns/name``, or ``none`` when no ALLOW policy admitted the
  caller), and for a denied connection points the app hop at :data:`REFUSED` instead of the
  app: the connect is refused, the TCP proxy closes the caller's connection, and the app never
  sees it — no greeting, no accepted socket. AUDIT policies name themselves in
  ``sidemesh.authz.tcp.audit``.

The chain's access logs count both per policy (:mod:`webhook.policy.envoy`). The RBAC filters
stay behind the gate: same rules, same answer, and their counters keep working.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

__all__ = [
    "AUDIT_KEY",
    "DENIED_KEY",
    "GATE",
    "GATE_TYPE",
    "REFUSED",
    "gate_values",
    "rbac_cel",
]

GATE: Final = "sidemesh.authz.tcp.gate"
GATE_TYPE: Final = "type.googleapis.com/envoy.extensions.filters.network.set_filter_state.v3.Config"
DENIED_KEY: Final = "sidemesh.authz.tcp.denied"
AUDIT_KEY: Final = "sidemesh.authz.tcp.audit"
#: Where a denied connection's app hop goes: a loopback port nothing listens on, so the connect
#: is refused at once (the inbound app cluster is an original-destination cluster, and this
#: filter state overrides its destination). Not a cluster of its own for denials: the TCP proxy
#: picks its cluster when the connection is accepted, before the gate has decided.
REFUSED: Final = "127.0.0.1:1"
_ORIGINAL_DST: Final = "envoy.network.transport_socket.original_dst_address"
_PEER: Final = "connection.uri_san_peer_certificate"


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _principal(p: Mapping[str, Any]) -> str:
    if p.get("any"):
        return "true"
    if "not_id" in p:
        return f"!({_principal(p['not_id'])})"
    if "or_ids" in p:
        return _any([_principal(i) for i in p["or_ids"]["ids"]])
    auth = p.get("authenticated")
    if auth is None:
        raise ValueError(f"no CEL for the RBAC principal {dict(p)!r}")
    match = auth.get("principal_name")
    if not match:
        return "connection.mtls"
    if "exact" in match:
        return f"(connection.mtls && {_PEER} == {_quote(match['exact'])})"
    if "prefix" in match:
        return f"(connection.mtls && {_PEER}.startsWith({_quote(match['prefix'])}))"
    raise ValueError(f"no CEL for the principal match {dict(match)!r}")


def _permission(p: Mapping[str, Any]) -> str:
    if p.get("any"):
        return "true"
    if "destination_port" in p:
        return f"destination.port == {int(p['destination_port'])}"
    if "or_rules" in p:
        return _any([_permission(r) for r in p["or_rules"]["rules"]])
    if "and_rules" in p:
        return "(" + " && ".join(_permission(r) for r in p["and_rules"]["rules"]) + ")"
    raise ValueError(f"no CEL for the network RBAC permission {dict(p)!r}")


def _any(terms: list[str]) -> str:
    return terms[0] if len(terms) == 1 else "(" + " || ".join(terms) + ")"


def rbac_cel(policy: Mapping[str, Any]) -> str:
    """One RBAC policy (permissions and principals) as a CEL condition on a connection."""
    permission = _any([_permission(p) for p in policy["permissions"]])
    principal = _any([_principal(p) for p in policy["principals"]])
    return f"({permission} && {principal})"


def _first_match(rules: Mapping[str, Any] | None, otherwise: str) -> str:
    """The name of the first policy of ``rules`` that matches, else ``otherwise``."""
    expr = otherwise
    for name, policy in reversed(list((rules or {}).get("policies", {}).items())):
        expr = f"{rbac_cel(policy)} ? {_quote(name)} : {expr}"
    return expr


def _value(key: str, cel: str) -> dict[str, Any]:
    return {
        "object_key": key,
        "factory_key": "envoy.string",
        "skip_if_empty": True,
        "format_string": {"text_format_source": {"inline_string": f"%CEL({cel})%"}},
    }


def gate_values(deny: Mapping[str, Any], allow: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The filter-state values the gate sets at the handshake, from the workload's network
    RBAC configs (``deny``: the DENY rules and the AUDIT shadow rules; ``allow``: the ALLOW
    rules, absent when no ALLOW policy selects the workload). Empty: nothing to decide."""
    allow_rules = allow.get("rules")
    if not deny.get("rules") and not deny.get("shadow_rules") and allow_rules is None:
        return []
    not_allowed = "''"
    if allow_rules is not None:
        admitted = [rbac_cel(p) for p in allow_rules.get("policies", {}).values()]
        not_allowed = f"{_any(admitted)} ? '' : 'none'" if admitted else "'none'"
    denied = _first_match(deny.get("rules"), not_allowed)
    values = [
        _value(DENIED_KEY, denied),
        {
            "object_key": _ORIGINAL_DST,
            "skip_if_empty": True,
            "format_string": {
                "text_format_source": {
                    "inline_string": f"%CEL({_quote(DENIED_KEY)} in filter_state ? "
                    f"{_quote(REFUSED)} : '')%"
                }
            },
        },
    ]
    if deny.get("shadow_rules"):
        values.append(_value(AUDIT_KEY, _first_match(deny["shadow_rules"], "''")))
    return values
