"""The ``sidemesh check`` explainer of HTTPRoute, GRPCRoute and TrafficPolicy: the routing table
of every rule in the file (and ``--mesh-dir``), then one object's summary and problems."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from webhook.cli.check import CheckContext, Explanation, Finding
from webhook.routing.api import TRAFFIC_POLICY, Problem
from webhook.routing.explain import describe_policy, describe_route
from webhook.routing.policy import parse_policy
from webhook.routing.routes import parse_route
from webhook.routing.table import RoutingTable, build_table

__all__ = ["explain"]

_NO_MESH = Finding(
    "metadata",
    "no Services given (put them in the file or pass --mesh-dir): "
    "references to Services and subsets are not checked",
    "warning",
)


def explain(obj: Mapping[str, Any], ctx: CheckContext) -> Explanation:
    table: RoutingTable | None = ctx.memo.get("routing")
    if table is None:
        table = build_table(ctx.objects, ctx.model)
        ctx.memo["routing"] = table
    kind = str(obj.get("kind"))
    meta = obj.get("metadata") or {}
    key = (kind, str(meta.get("namespace")), str(meta.get("name") or ""))
    if kind == TRAFFIC_POLICY:
        policy = parse_policy(obj)
        lines = describe_policy(policy, table)
    else:
        route = parse_route(obj)
        lines = describe_route(route, table)
    mine = [p for p in table.problems if (p.kind, p.namespace, p.name) == key]
    if not ctx.model.services:
        # Without a mesh every reference looks missing: say that once, not per reference.
        mine = [p for p in mine if not _is_reference(p)]
        findings = [_NO_MESH]
    else:
        findings = []
    findings += [Finding(p.field, p.message, p.severity) for p in _unique(mine)]
    return Explanation(tuple(lines), tuple(findings))


def _is_reference(p: Problem) -> bool:
    return p.message.startswith(("no Service", "Service ", "no ready endpoint"))


def _unique(problems: list[Problem]) -> list[Problem]:
    seen: set[tuple[str, str]] = set()
    out = []
    for p in problems:
        if (p.field, p.message) not in seen:
            seen.add((p.field, p.message))
            out.append(p)
    return out
