"""What a policy applies to, in words, and which of its references resolve to nothing. Pure.

The control plane logs these and shows them on ``/debug/policies``; ``sidemesh check`` shows
them per document. A reference that resolves to nothing is not an error (the workload or
service account may come later) but usually a typo, so it is reported as a warning: a selector
that selects no pod, a service account no pod runs as, a namespace with no pod.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from webhook.discovery.model import MeshModel, PodInfo
from webhook.policy.compiler import rule_ids
from webhook.policy.model import AccessPolicy, Operation, Source
from webhook.ratelimit.model import RateLimitPolicy

__all__ = ["describe_access", "describe_limits", "selected_pods", "summary", "unresolved"]


def selected_pods(policy: AccessPolicy | RateLimitPolicy, model: MeshModel, root: str) -> list[str]:
    out = []
    for pod in model.pods.values():
        if isinstance(policy, AccessPolicy):
            hit = policy.selects(pod.namespace, pod.labels, root)
        else:
            hit = policy.selects(pod.namespace, pod.labels)
        if hit:
            out.append(f"{pod.namespace}/{pod.name}")
    return sorted(out)


def _source(s: Source) -> str:
    return s.kind if not s.value else f"{s.kind} {s.value}"


def _operation(op: Operation) -> str:
    parts = []
    if op.ports:
        parts.append("ports " + ", ".join(map(str, op.ports)))
    if op.paths:
        parts.append("paths " + ", ".join(op.paths))
    if op.methods:
        parts.append("methods " + ", ".join(op.methods))
    parts += [f"header {k}: {v}" for k, v in op.headers]
    return "; ".join(parts) or "anything"


def describe_access(policy: AccessPolicy, model: MeshModel, root: str) -> list[str]:
    scope = f"labels {dict(policy.selector)}" if policy.selector is not None else "every workload"
    where = "the whole mesh" if policy.namespace == root else f"namespace {policy.namespace}"
    pods = selected_pods(policy, model, root)
    lines = [f"{policy.action} in {where}, {scope}: selects {', '.join(pods) or 'no pod'}"]
    if not policy.rules:
        lines.append(
            "no rules: matches nothing" + (" (a default deny)" if policy.action == "ALLOW" else "")
        )
    for rule, rid in zip(policy.rules, rule_ids(policy), strict=True):
        who = " or ".join(_source(s) for s in rule.sources) or "any caller"
        lines.append(f"{rid}: from {who}; to {_operation(rule.to)}")
        if rule.to.http_only:
            on_tcp = (
                "admits nothing" if policy.action == "ALLOW" else "ignores paths/methods/headers"
            )
            lines.append(f"  on TCP connections this rule {on_tcp}")
    return lines


def describe_limits(policy: RateLimitPolicy, model: MeshModel) -> list[str]:
    pods = selected_pods(policy, model, "")
    mode = "fail open" if policy.fail_open else "fail closed"
    lines = [f"selects {', '.join(pods) or 'no pod'}; Global limits {mode} without the service"]
    for limit, lid in zip(policy.limits, policy.limit_ids(), strict=True):
        who = " per caller" if limit.per_caller else ""
        what = ", ".join([*limit.methods, *limit.paths]) or "every request"
        kind = "shared by every replica" if limit.scope == "Global" else "per sidecar"
        lines.append(f"{lid}: {limit.requests}/{limit.per}{who} ({kind}) for {what}")
    return lines


def _pods(model: MeshModel) -> Iterable[PodInfo]:
    return model.pods.values()


def unresolved(
    policy: AccessPolicy | RateLimitPolicy, model: MeshModel, root: str
) -> list[tuple[str, str]]:
    """``(field, message)`` for each reference that resolves to nothing in ``model``."""
    out: list[tuple[str, str]] = []
    if not selected_pods(policy, model, root):
        out.append(("spec.selector", "selects no pod (yet)"))
    if not isinstance(policy, AccessPolicy):
        return out
    accounts = {(p.namespace, p.service_account) for p in _pods(model)}
    namespaces = {p.namespace for p in _pods(model)}
    for i, rule in enumerate(policy.rules):
        for j, source in enumerate(rule.sources):
            where = f"spec.rules[{i}].from[{j}]"
            if source.kind == "serviceAccount":
                ns, sa = source.value.split("/", 1)
                if (ns, sa) not in accounts:
                    out.append((f"{where}.serviceAccount", f"no pod runs as {source.value}"))
            elif source.kind == "namespace" and source.value not in namespaces:
                out.append((f"{where}.namespace", f"no pod in namespace {source.value}"))
    return out


def summary(
    access: Iterable[AccessPolicy],
    limits: Iterable[RateLimitPolicy],
    errors: dict[str, str],
    model: MeshModel,
    root: str,
) -> dict[str, Any]:
    """The ``/debug/policies`` page."""
    return {
        "access": [
            {
                "policy": p.id,
                "action": p.action,
                "selects": selected_pods(p, model, root),
                "unresolved": [f"{f}: {m}" for f, m in unresolved(p, model, root)],
            }
            for p in access
        ],
        "ratelimit": [
            {
                "policy": p.id,
                "selects": selected_pods(p, model, root),
                "limits": describe_limits(p, model)[1:],
                "unresolved": [f"{f}: {m}" for f, m in unresolved(p, model, root)],
            }
            for p in limits
        ],
        "not_enforced": errors,
    }
