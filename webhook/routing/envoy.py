"""The routing table in Envoy's terms (pure): routes of a RouteConfiguration, the cluster
settings of a TrafficPolicy, subset clusters, and the fault filter of the outbound HCM.

Every route carries where it came from: its ``name`` is the rule (``HTTPRoute demo/web
rules[0]``) and its metadata (``filter_metadata["sidemesh.io/rule"]``) says it again with the
policy that added retries or faults, so ``sidemesh proxy-config POD --routes`` can show it.
"""

from __future__ import annotations

import copy
from typing import Any, Final

from webhook.discovery.l7 import DEFAULT_RETRY
from webhook.routing.api import envoy_duration
from webhook.routing.matches import Match
from webhook.routing.policy import Fault, HashOn, Retries, TrafficPolicy
from webhook.routing.refs import Target
from webhook.routing.rewrite import redirect_action, rewrite_fields
from webhook.routing.routes import HeaderOps
from webhook.routing.table import RouteEntry

__all__ = [
    "FAULT_FILTER",
    "RULE_METADATA",
    "apply_cluster_policy",
    "default_route",
    "entry_route",
]

_TYPE: Final = "@type"
#: Route metadata namespace naming the rule and policy a route came from.
RULE_METADATA: Final = "sidemesh.io/rule"
_FAULT: Final = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
#: The outbound HCM's fault filter (before the router): it does nothing until a route's
#: ``typed_per_filter_config`` says what to inject.
FAULT_FILTER: Final = {"name": "envoy.filters.http.fault", "typed_config": {_TYPE: _FAULT}}


def _percent(value: float) -> dict[str, Any]:
    return {"numerator": round(value * 10_000), "denominator": "MILLION"}


def _match(m: Match) -> dict[str, Any]:
    out: dict[str, Any] = {}
    path = m.path
    if path.type == "Exact":
        out["path"] = path.value
    elif path.type == "RegularExpression":
        out["safe_regex"] = {"regex": path.value}
    elif path.value.rstrip("/") == "":
        out["prefix"] = "/"
    else:
        # The Gateway API's prefix is by path element: /foo matches /foo and /foo/x, not /foox.
        out["path_separated_prefix"] = path.value.rstrip("/")
    headers = [{"name": h.name, "string_match": _string(h.type, h.value)} for h in m.headers]
    if m.method:
        headers.append({"name": ":method", "string_match": {"exact": m.method}})
    if headers:
        out["headers"] = headers
    if m.query:
        out["query_parameters"] = [
            {"name": q.name, "string_match": _string(q.type, q.value)} for q in m.query
        ]
    return out


def _string(kind: str, value: str) -> dict[str, Any]:
    return {"exact": value} if kind == "Exact" else {"safe_regex": {"regex": value}}


def _retry_policy(retries: Retries | None, per_try: float | None) -> dict[str, Any]:
    """The mesh's safe retries (a request that never reached the app), or the policy's; the
    safe conditions stay in either case. A retry goes to another replica when there is one."""
    out: dict[str, Any] = copy.deepcopy(DEFAULT_RETRY)
    if retries is not None:
        safe = str(DEFAULT_RETRY["retry_on"]).split(",")
        out["retry_on"] = ",".join(dict.fromkeys([*retries.retry_on, *safe]))
        out["num_retries"] = retries.attempts
        if retries.status_codes:
            out["retriable_status_codes"] = list(retries.status_codes)
        if retries.per_try_timeout is not None and per_try is None:
            per_try = retries.per_try_timeout
    if per_try is not None:
        out["per_try_timeout"] = envoy_duration(per_try)
    return out


def _hash_policy(hash_on: HashOn) -> list[dict[str, Any]]:
    if hash_on.header:
        return [{"header": {"header_name": hash_on.header}}]
    if hash_on.cookie:
        cookie: dict[str, Any] = {"name": hash_on.cookie}
        if hash_on.cookie_ttl is not None:
            cookie["ttl"] = envoy_duration(hash_on.cookie_ttl)
        return [{"cookie": cookie}]
    return [{"connection_properties": {"source_ip": True}}]


def _fault(fault: Fault) -> dict[str, Any]:
    out: dict[str, Any] = {_TYPE: _FAULT}
    if fault.delay:
        out["delay"] = {
            "fixed_delay": envoy_duration(fault.delay.seconds),
            "percentage": _percent(fault.delay.percent),
        }
    if fault.abort:
        abort: dict[str, Any] = {"percentage": _percent(fault.abort.percent)}
        if fault.abort.http_status is not None:
            abort["http_status"] = fault.abort.http_status
        else:
            abort["grpc_status"] = fault.abort.grpc_status
        out["abort"] = abort
    return out


def _headers(route: dict[str, Any], ops: HeaderOps | None, side: str) -> None:
    if ops is None:
        return
    adds = [
        {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        for k, v in ops.set
    ] + [
        {"header": {"key": k, "value": v}, "append_action": "APPEND_IF_EXISTS_OR_ADD"}
        for k, v in ops.add
    ]
    if adds:
        route[f"{side}_headers_to_add"] = adds
    if ops.remove:
        route[f"{side}_headers_to_remove"] = list(ops.remove)


def _action(
    targets: tuple[Target, ...],
    policy: TrafficPolicy | None,
    timeout: float | None,
    per_try: float | None,
) -> dict[str, Any]:
    action: dict[str, Any] = {}
    if len(targets) == 1:
        action["cluster"] = targets[0].cluster
    else:
        action["weighted_clusters"] = {
            "clusters": [{"name": t.cluster, "weight": t.weight} for t in targets]
        }
    # An unusable backend is a cluster that does not exist: the Gateway API asks for a 500.
    action["cluster_not_found_response_code"] = "INTERNAL_SERVER_ERROR"
    # No time limit unless a rule sets one: the app had none without the mesh.
    action["timeout"] = envoy_duration(timeout) if timeout else "0s"
    action["retry_policy"] = _retry_policy(policy.retries if policy else None, per_try)
    if policy is not None and policy.hash_on is not None:
        action["hash_policy"] = _hash_policy(policy.hash_on)
    return action


def _decorate(route: dict[str, Any], source: str, policy: TrafficPolicy | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"rule": source}
    if policy is not None:
        meta["policy"] = policy.ref
        if policy.fault is not None:
            route["typed_per_filter_config"] = {"envoy.filters.http.fault": _fault(policy.fault)}
    route["metadata"] = {"filter_metadata": {RULE_METADATA: meta}}
    return route


def entry_route(entry: RouteEntry, policy: TrafficPolicy | None) -> dict[str, Any]:
    """One Envoy route for one match of a rule; ``policy`` is the TrafficPolicy of the Service
    the request was sent to (retries, faults, hashing)."""
    rule = entry.rule
    route: dict[str, Any] = {"name": entry.source, "match": _match(entry.match)}
    prefix = entry.match.path.value if entry.match.path.type == "PathPrefix" else None
    if rule.redirect is not None:
        route["redirect"] = redirect_action(rule.redirect, prefix)
    elif entry.targets:
        action = _action(entry.targets, policy, rule.timeout, rule.backend_timeout)
        if entry.mirrors:
            action["request_mirror_policies"] = [
                {"cluster": c, "runtime_fraction": {"default_value": _percent(p)}}
                for c, p in entry.mirrors
            ]
        if rule.rewrite is not None:
            action.update(rewrite_fields(rule.rewrite, prefix))
        route["route"] = action
    else:
        # No usable backend at all (or all weights 0): the Gateway API's 500.
        route["direct_response"] = {"status": 500}
    _headers(route, rule.request_headers, "request")
    _headers(route, rule.response_headers, "response")
    return _decorate(route, entry.source, policy)


def default_route(cluster: str, policy: TrafficPolicy | None) -> dict[str, Any]:
    """The route of a Service port that no route attaches to: everything to its own cluster,
    with its TrafficPolicy's retries, faults and hashing."""
    route: dict[str, Any] = {
        "name": "default",
        "match": {"prefix": "/"},
        "route": _action((Target(cluster, 1, cluster),), policy, None, None),
    }
    return _decorate(route, "default", policy)


def apply_cluster_policy(cluster: dict[str, Any], policy: TrafficPolicy | None) -> dict[str, Any]:
    """``cluster`` with the policy's circuit breaking, retry budget, outlier detection and
    load balancing (a new dict; without a policy, ``cluster`` itself)."""
    if policy is None:
        return cluster
    out = copy.deepcopy(cluster)
    thresholds = out.setdefault("circuit_breakers", {}).setdefault("thresholds", [{}])
    default = next((t for t in thresholds if t.get("priority", "DEFAULT") == "DEFAULT"), None)
    if default is None:
        default = {}
        thresholds.append(default)
    cb = policy.circuit_breaker
    if cb is not None:
        for key, value in (
            ("max_connections", cb.max_connections),
            ("max_pending_requests", cb.max_pending_requests),
            ("max_requests", cb.max_requests),
            ("max_retries", cb.max_retries),
        ):
            if value is not None:
                default[key] = value
    retries = policy.retries
    if retries is not None and retries.budget_percent is not None:
        budget: dict[str, Any] = {"budget_percent": {"value": retries.budget_percent}}
        if retries.min_retry_concurrency is not None:
            budget["min_retry_concurrency"] = retries.min_retry_concurrency
        default["retry_budget"] = budget
    if policy.outlier is not None:
        o = policy.outlier
        out["outlier_detection"] = {
            "consecutive_5xx": o.consecutive_5xx,
            "interval": envoy_duration(o.interval),
            "base_ejection_time": envoy_duration(o.base_ejection_time),
            "max_ejection_percent": o.max_ejection_percent,
        }
    if policy.lb_policy is not None:
        out["lb_policy"] = policy.lb_policy
    return out
