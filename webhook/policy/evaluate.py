"""Decide one request the way the sidecar will: by evaluating the RBAC filter configs it gets.

Pure. :func:`decide` reads the same dicts :mod:`webhook.policy.compiler` hands the proxies (or
the ones a proxy was actually sent, decoded from the control plane's ``/debug/config``), in
Envoy's order: the deny filter, then the allow filter; AUDIT shadow rules are reported, never
decisive. Only the RBAC subset the compiler emits is understood; anything else is an error, not a
guess.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from webhook.policy.compiler import ECDS_NAMES
from webhook.policy.model import PolicyError

__all__ = ["Decision", "Request", "decide"]


@dataclass(frozen=True)
class Request:
    #: The caller's verified SPIFFE id; None for a plaintext caller.
    principal: str | None
    port: int
    #: None for a TCP connection (no HTTP request to look at).
    path: str | None = None
    method: str = "GET"
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    #: The RBAC policy (``ns/name`` or ``ns/name#N``) that decided, None when none did.
    policy: str | None
    reason: str
    #: AUDIT policies that matched (counted and logged by the sidecar).
    audited: tuple[str, ...] = ()


def decide(filters: Mapping[str, Mapping[str, Any]], req: Request) -> Decision:
    layer = "tcp" if req.path is None else "http"
    deny_name, allow_name = ECDS_NAMES[layer]
    deny, allow = filters.get(deny_name, {}), filters.get(allow_name, {})
    audited = tuple(_matching(deny.get("shadow_rules"), req))
    denied_by = _matching(deny.get("rules"), req)
    if denied_by:
        return Decision(False, denied_by[0], f"denied by DENY policy {denied_by[0]}", audited)
    rules = allow.get("rules")
    if rules is None:
        return Decision(True, None, "allowed: no ALLOW policy selects this workload", audited)
    allowed_by = _matching(rules, req)
    if allowed_by:
        return Decision(True, allowed_by[0], f"allowed by ALLOW policy {allowed_by[0]}", audited)
    return Decision(
        False, None, "denied: ALLOW policies select this workload and none matched", audited
    )


def _matching(rbac: Mapping[str, Any] | None, req: Request) -> list[str]:
    if not rbac:
        return []
    out = []
    for name, pol in sorted((rbac.get("policies") or {}).items()):
        principals = pol.get("principals") or []
        permissions = pol.get("permissions") or []
        if any(_principal(p, req) for p in principals) and any(
            _permission(p, req) for p in permissions
        ):
            out.append(name)
    return out


def _string(matcher: Mapping[str, Any], value: str) -> bool:
    if "exact" in matcher:
        return value == str(matcher["exact"])
    if "prefix" in matcher:
        return value.startswith(str(matcher["prefix"]))
    if "suffix" in matcher:
        return value.endswith(str(matcher["suffix"]))
    raise PolicyError(f"unsupported string matcher {dict(matcher)}")


def _principal(p: Mapping[str, Any], req: Request) -> bool:
    if p.get("any"):
        return True
    if "not_id" in p:
        return not _principal(p["not_id"], req)
    if "authenticated" in p:
        if req.principal is None:
            return False
        name = (p["authenticated"] or {}).get("principal_name")
        return name is None or _string(name, req.principal)
    raise PolicyError(f"unsupported RBAC principal {dict(p)}")


def _permission(p: Mapping[str, Any], req: Request) -> bool:
    if p.get("any"):
        return True
    if "destination_port" in p:
        return req.port == int(p["destination_port"])
    if "and_rules" in p:
        return all(_permission(r, req) for r in p["and_rules"]["rules"])
    if "or_rules" in p:
        return any(_permission(r, req) for r in p["or_rules"]["rules"])
    if "url_path" in p:
        if req.path is None:
            return False
        return _string(p["url_path"]["path"], req.path.split("?", 1)[0])
    if "header" in p:
        h = p["header"]
        value = req.method if h["name"] == ":method" else req.headers.get(h["name"])
        if req.path is None or value is None:
            return False
        return bool(h.get("present_match")) or _string(h["string_match"], value)
    raise PolicyError(f"unsupported RBAC permission {dict(p)}")
