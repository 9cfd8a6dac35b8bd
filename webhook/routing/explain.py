"""Plain-language summaries of traffic rules: what each applies to and what it does (pure).

``sidemesh check`` prints these next to the problems of :func:`~webhook.routing.table.build_table`,
so a user sees both what a rule will do and what is wrong with it before it reaches a proxy.
"""

from __future__ import annotations

from typing import Any

from webhook.routing.api import envoy_duration
from webhook.routing.matches import Match
from webhook.routing.policy import TrafficPolicy
from webhook.routing.routes import Route, Rule
from webhook.routing.table import RoutingTable

__all__ = ["describe_policy", "describe_route"]


def _seconds(value: float) -> str:
    return "none" if value == 0 else envoy_duration(value)


def _match(m: Match) -> str:
    parts = [f"path {m.path.type} {m.path.value}"]
    if m.method:
        parts.append(f"method {m.method}")
    parts += [f"header {h.name} {'=' if h.type == 'Exact' else '~'} {h.value}" for h in m.headers]
    parts += [f"query {q.name} {'=' if q.type == 'Exact' else '~'} {q.value}" for q in m.query]
    return " and ".join(parts)


def _change(host: str | None, path: Any, scheme: str | None = None, port: int | None = None) -> str:
    parts = [f"scheme {scheme}"] if scheme else []
    parts += [f"host {host}"] if host else []
    parts += [f"port {port}"] if port else []
    if path is not None:
        what = "path" if path.type == "ReplaceFullPath" else "prefix"
        parts.append(f"{what} {path.value}")
    return ", ".join(parts) or "as it is"


def _rule(route: Route, rule: Rule) -> list[str]:
    when = " or ".join(f"({_match(m)})" for m in rule.matches) or "never (no usable match)"
    total = sum(b.weight for b in rule.backends if b.weight > 0)
    if rule.redirect is not None:
        r = rule.redirect
        where = _change(r.hostname, r.path, r.scheme, r.port)
        return [f"rules[{rule.index}]: when {when} → redirect ({r.status}) {where}"]
    if total:
        to = ", ".join(
            f"{round(100 * b.weight / total, 1):g}% {b.label}"
            + (" [invalid: 500]" if b.invalid else "")
            for b in rule.backends
            if b.weight > 0
        )
    else:
        to = "nothing: answered 500"
    out = [f"rules[{rule.index}]: when {when} → {to}"]
    extras = []
    if rule.timeout is not None:
        extras.append(f"timeout {_seconds(rule.timeout)}")
    if rule.backend_timeout is not None:
        extras.append(f"per-try timeout {_seconds(rule.backend_timeout)}")
    if rule.request_headers:
        extras.append("request headers modified")
    if rule.response_headers:
        extras.append("response headers modified")
    extras += [f"mirror {m.percent:g}% to {m.backend.label}" for m in rule.mirrors]
    if rule.rewrite is not None:
        extras.append(f"rewrite {_change(rule.rewrite.hostname, rule.rewrite.path)}")
    if extras:
        out.append(f"  {', '.join(extras)}")
    return out


def describe_route(route: Route, table: RoutingTable) -> list[str]:
    ports = table.applies_to.get(route.ref, ())
    lines = [f"applies to requests for {', '.join(ports) or 'nothing'}"]
    for rule in route.rules:
        lines += _rule(route, rule)
    policies = {
        p.ref
        for key, p in table.policies.items()
        if any(port.startswith(f"{key[0]}/{key[1]}:") for port in ports)
    }
    if policies:
        lines.append(f"with retries/faults/hashing of {', '.join(sorted(policies))}")
    return lines


def describe_policy(policy: TrafficPolicy, table: RoutingTable) -> list[str]:
    ports = table.applies_to.get(policy.ref, ())
    lines = [f"applies to {', '.join(ports) or 'nothing'}"]
    for name, labels in policy.subsets:
        selector = ", ".join(f"{k}={v}" for k, v in labels)
        lines.append(f"subset {name}: pods with {selector}")
    if policy.retries:
        r = policy.retries
        per_try = f", {_seconds(r.per_try_timeout)} per try" if r.per_try_timeout else ""
        budget = f", budget {r.budget_percent:g}% of active requests" if r.budget_percent else ""
        lines.append(f"retries: up to {r.attempts} on {', '.join(r.retry_on)}{per_try}{budget}")
    if policy.fault:
        if policy.fault.delay:
            d = policy.fault.delay
            lines.append(f"fault: delay {_seconds(d.seconds)} on {d.percent:g}% of requests")
        if policy.fault.abort:
            a = policy.fault.abort
            status = f"HTTP {a.http_status}" if a.http_status else f"gRPC status {a.grpc_status}"
            lines.append(f"fault: abort with {status} on {a.percent:g}% of requests")
    if policy.circuit_breaker:
        cb = policy.circuit_breaker
        limits = [
            f"{label} {value}"
            for label, value in (
                ("connections", cb.max_connections),
                ("pending requests", cb.max_pending_requests),
                ("requests", cb.max_requests),
                ("retries", cb.max_retries),
            )
            if value is not None
        ]
        lines.append(f"circuit breaker: at most {', '.join(limits)} (beyond: 503 at once)")
    if policy.outlier:
        o = policy.outlier
        lines.append(
            f"outlier detection: eject a replica after {o.consecutive_5xx} consecutive 5xx "
            f"(checked every {_seconds(o.interval)}, out for {_seconds(o.base_ejection_time)} "
            f"and longer each time, at most {o.max_ejection_percent}% of replicas)"
        )
    if policy.lb_policy:
        lb = policy.lb_policy.replace("_", " ").lower()
        if policy.hash_on:
            h = policy.hash_on
            on = (
                f"header {h.header}"
                if h.header
                else f"cookie {h.cookie}"
                if h.cookie
                else "source IP"
            )
            lb += f" on {on}"
        lines.append(f"load balancing: {lb}")
    return lines
