"""``TrafficPolicy`` (``sidemesh.io/v1alpha1``): what the Gateway API has no field for (pure).

One TrafficPolicy targets one Service of its own namespace (``spec.targetRef``). What it sets
applies in two places:

============================  ===============================================================
on the Service's clusters     ``subsets`` (pods by label, each its own cluster),
(it as a backend)             ``connectionPool`` (circuit breaking), ``outlierDetection``,
                              ``loadBalancer.policy``, ``retries.budget``
on the Service's routes       ``retries`` (attempts, per-try timeout, conditions), ``fault``
(requests sent to it)         (delay / abort), ``loadBalancer.consistentHash`` (what to hash)
============================  ===============================================================

The CRD's schema and CEL rules refuse most mistakes at ``kubectl apply``; this parser checks
the same again (files, ``sidemesh check`` and clusters without the CRD's validation), and
reports what is wrong as problems, keeping the parts that are right.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from webhook.routing.api import TRAFFIC_POLICY, Problem, Reader, as_map, parse_duration

__all__ = [
    "RETRY_ON",
    "Abort",
    "CircuitBreaker",
    "Delay",
    "Fault",
    "HashOn",
    "Outlier",
    "Retries",
    "TrafficPolicy",
    "parse_policy",
]

#: Envoy's retry conditions a user may name (HTTP, then gRPC).
RETRY_ON: Final = (
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
)
_LB: Final = {
    "RoundRobin": "ROUND_ROBIN",
    "LeastRequest": "LEAST_REQUEST",
    "Random": "RANDOM",
    "ConsistentHash": "RING_HASH",
}
_LABEL_NAME: Final = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_DNS_LABEL: Final = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class Retries:
    attempts: int
    per_try_timeout: float | None
    retry_on: tuple[str, ...]
    status_codes: tuple[int, ...] = ()
    #: Retry budget: at most this percent of active requests may be retries (None: Envoy's
    #: fixed limit of concurrent retries).
    budget_percent: float | None = None
    min_retry_concurrency: int | None = None


@dataclass(frozen=True)
class Delay:
    seconds: float
    percent: float


@dataclass(frozen=True)
class Abort:
    percent: float
    http_status: int | None = None
    grpc_status: int | None = None


@dataclass(frozen=True)
class Fault:
    delay: Delay | None = None
    abort: Abort | None = None


@dataclass(frozen=True)
class CircuitBreaker:
    max_connections: int | None = None
    max_pending_requests: int | None = None
    max_requests: int | None = None
    max_retries: int | None = None


@dataclass(frozen=True)
class Outlier:
    consecutive_5xx: int
    interval: float
    base_ejection_time: float
    max_ejection_percent: int


@dataclass(frozen=True)
class HashOn:
    header: str | None = None
    cookie: str | None = None
    cookie_ttl: float | None = None
    source_ip: bool = False


@dataclass(frozen=True)
class TrafficPolicy:
    namespace: str
    name: str
    service: str
    created: str = ""
    subsets: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    retries: Retries | None = None
    fault: Fault | None = None
    circuit_breaker: CircuitBreaker | None = None
    outlier: Outlier | None = None
    #: Envoy's lb_policy (None: round robin, the default).
    lb_policy: str | None = None
    hash_on: HashOn | None = None
    problems: tuple[Problem, ...] = field(default=(), compare=False)

    @property
    def ref(self) -> str:
        return f"{TRAFFIC_POLICY} {self.namespace}/{self.name}"

    def subset_labels(self, name: str) -> dict[str, str] | None:
        for subset, labels in self.subsets:
            if subset == name:
                return dict(labels)
        return None


class _Reader(Reader):
    """The routes' reader, with the value checks a TrafficPolicy's fields need."""

    def __init__(self, namespace: str, name: str) -> None:
        super().__init__(TRAFFIC_POLICY, namespace, name)

    def int_(self, raw: Mapping[str, Any], key: str, where: str, lo: int, hi: int) -> int | None:
        value = raw.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            self.bad(f"{where}.{key}", f"{value!r} must be a whole number from {lo} to {hi}")
            return None
        return value

    def percent(self, raw: Mapping[str, Any], where: str) -> float | None:
        value = raw.get("percent", 100)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
            self.bad(f"{where}.percent", f"{value!r} must be a number from 0 to 100")
            return None
        return float(value)

    def duration(self, raw: Mapping[str, Any], key: str, where: str) -> float | None:
        if raw.get(key) is None:
            return None
        try:
            return parse_duration(raw[key])
        except ValueError as exc:
            self.bad(f"{where}.{key}", str(exc))
            return None


def parse_policy(obj: Mapping[str, Any]) -> TrafficPolicy:
    meta, spec = as_map(obj.get("metadata")), as_map(obj.get("spec"))
    namespace, name = str(meta.get("namespace") or "default"), str(meta.get("name") or "")
    r = _Reader(namespace, name)
    target = as_map(spec.get("targetRef"))
    service = str(target.get("name") or "")
    if (target.get("group") or "") != "" or target.get("kind", "Service") != "Service":
        r.bad("spec.targetRef", 'must name a Service (group "", kind Service)')
        service = ""
    elif not service:
        r.bad("spec.targetRef.name", "is required")
    lb_policy, hash_on = _load_balancer(r, as_map(spec.get("loadBalancer")))
    policy = TrafficPolicy(
        namespace=namespace,
        name=name,
        service=service,
        created=str(meta.get("creationTimestamp") or ""),
        subsets=_subsets(r, spec.get("subsets")),
        retries=_retries(r, as_map(spec.get("retries"))) if "retries" in spec else None,
        fault=_fault(r, as_map(spec.get("fault"))) if "fault" in spec else None,
        circuit_breaker=_pool(r, as_map(spec.get("connectionPool")))
        if "connectionPool" in spec
        else None,
        outlier=_outlier(r, as_map(spec.get("outlierDetection")))
        if "outlierDetection" in spec
        else None,
        lb_policy=lb_policy,
        hash_on=hash_on,
    )
    known = {
        "targetRef",
        "subsets",
        "retries",
        "fault",
        "connectionPool",
        "outlierDetection",
        "loadBalancer",
    }
    for key in spec:
        if key not in known:
            r.bad(f"spec.{key}", f"unknown field (known: {', '.join(sorted(known))})")
    return TrafficPolicy(**{**policy.__dict__, "problems": tuple(r.problems)})


def _subsets(r: _Reader, raw: Any) -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        r.bad("spec.subsets", "must be a list")
        return ()
    out: list[tuple[str, tuple[tuple[str, str], ...]]] = []
    for i, item in enumerate(raw):
        where = f"spec.subsets[{i}]"
        item = as_map(item)
        name, labels = item.get("name"), as_map(item.get("labels"))
        if not isinstance(name, str) or not _DNS_LABEL.match(name):
            r.bad(f"{where}.name", f"{name!r} must be a DNS label (a-z, 0-9, -)")
            continue
        if any(name == n for n, _ in out):
            r.bad(f"{where}.name", f"subset {name!r} is defined twice")
            continue
        if not labels:
            r.bad(f"{where}.labels", "needs at least one label (else it is the whole Service)")
            continue
        bad = [
            k for k, v in labels.items() if not _LABEL_NAME.match(str(k)) or not isinstance(v, str)
        ]
        if bad:
            r.bad(f"{where}.labels", f"not a label name with a string value: {bad}")
            continue
        out.append((name, tuple(sorted((str(k), str(v)) for k, v in labels.items()))))
    return tuple(out)


def _retries(r: _Reader, raw: Mapping[str, Any]) -> Retries | None:
    where = "spec.retries"
    attempts = r.int_(raw, "attempts", where, 0, 10)
    per_try = r.duration(raw, "perTryTimeout", where)
    retry_on = raw.get("retryOn", ["5xx", "reset", "connect-failure"])
    if not isinstance(retry_on, list) or not retry_on:
        r.bad(f"{where}.retryOn", f"must be a non-empty list of: {', '.join(RETRY_ON)}")
        return None
    unknown = [c for c in retry_on if c not in RETRY_ON]
    if unknown:
        r.bad(f"{where}.retryOn", f"unknown {unknown}; known: {', '.join(RETRY_ON)}")
        return None
    codes = raw.get("retriableStatusCodes") or []
    if not isinstance(codes, list) or not all(
        isinstance(c, int) and 100 <= c <= 599 for c in codes
    ):
        r.bad(f"{where}.retriableStatusCodes", "must be a list of HTTP status codes")
        codes = []
    if codes and "retriable-status-codes" not in retry_on:
        retry_on = [*retry_on, "retriable-status-codes"]
    budget = as_map(raw.get("budget"))
    percent = None
    if budget:
        value = budget.get("percent")
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 100:
            r.bad(f"{where}.budget.percent", f"{value!r} must be a number above 0, at most 100")
        else:
            percent = float(value)
    min_conc = r.int_(budget, "minRetryConcurrency", f"{where}.budget", 1, 1_000_000)
    return Retries(
        attempts if attempts is not None else 2,
        per_try,
        tuple(retry_on),
        tuple(codes),
        percent,
        min_conc,
    )


def _fault(r: _Reader, raw: Mapping[str, Any]) -> Fault | None:
    delay = abort = None
    d = as_map(raw.get("delay"))
    if d:
        seconds = r.duration(d, "fixedDelay", "spec.fault.delay")
        percent = r.percent(d, "spec.fault.delay")
        if seconds is None and "fixedDelay" not in d:
            r.bad("spec.fault.delay.fixedDelay", "is required")
        if seconds is not None and percent is not None:
            delay = Delay(seconds, percent)
    a = as_map(raw.get("abort"))
    if a:
        percent = r.percent(a, "spec.fault.abort")
        http = r.int_(a, "httpStatus", "spec.fault.abort", 200, 599)
        grpc = r.int_(a, "grpcStatus", "spec.fault.abort", 1, 16)
        if (http is None) == (grpc is None):
            r.bad("spec.fault.abort", "set exactly one of httpStatus and grpcStatus")
        elif percent is not None:
            abort = Abort(percent, http, grpc)
    if delay is None and abort is None:
        if not d and not a:
            r.bad("spec.fault", "set delay, abort or both")
        return None
    return Fault(delay, abort)


def _pool(r: _Reader, raw: Mapping[str, Any]) -> CircuitBreaker | None:
    where = "spec.connectionPool"
    values = {
        k: r.int_(raw, k, where, 1, 2**31 - 1)
        for k in ("maxConnections", "maxPendingRequests", "maxRequests", "maxRetries")
    }
    if all(v is None for v in values.values()):
        r.bad(
            where, "set at least one of maxConnections, maxPendingRequests, maxRequests, maxRetries"
        )
        return None
    return CircuitBreaker(
        values["maxConnections"],
        values["maxPendingRequests"],
        values["maxRequests"],
        values["maxRetries"],
    )


def _outlier(r: _Reader, raw: Mapping[str, Any]) -> Outlier | None:
    where = "spec.outlierDetection"
    consecutive = r.int_(raw, "consecutive5xx", where, 1, 1000)
    interval = r.duration(raw, "interval", where)
    base = r.duration(raw, "baseEjectionTime", where)
    max_percent = r.int_(raw, "maxEjectionPercent", where, 1, 100)
    return Outlier(
        consecutive if consecutive is not None else 5,
        interval if interval is not None else 10.0,
        base if base is not None else 30.0,
        max_percent if max_percent is not None else 50,
    )


def _load_balancer(r: _Reader, raw: Mapping[str, Any]) -> tuple[str | None, HashOn | None]:
    if not raw:
        return None, None
    policy = raw.get("policy", "RoundRobin")
    if policy not in _LB:
        r.bad("spec.loadBalancer.policy", f"{policy!r}: want one of {', '.join(_LB)}")
        return None, None
    hashing = as_map(raw.get("consistentHash"))
    if policy != "ConsistentHash":
        if hashing:
            r.bad("spec.loadBalancer.consistentHash", "only with policy ConsistentHash")
        return _LB[policy], None
    header, cookie = hashing.get("header"), as_map(hashing.get("cookie"))
    source_ip = hashing.get("sourceIP") is True
    if sum(1 for x in (header, cookie, source_ip) if x) != 1:
        r.bad("spec.loadBalancer.consistentHash", "set exactly one of header, cookie, sourceIP")
        return None, None
    if header is not None:
        if not isinstance(header, str) or not header:
            r.bad("spec.loadBalancer.consistentHash.header", "must be a header name")
            return None, None
        return _LB[policy], HashOn(header=header.lower())
    if cookie:
        name = cookie.get("name")
        if not isinstance(name, str) or not name:
            r.bad("spec.loadBalancer.consistentHash.cookie.name", "is required")
            return None, None
        ttl = r.duration(cookie, "ttl", "spec.loadBalancer.consistentHash.cookie")
        return _LB[policy], HashOn(cookie=name, cookie_ttl=ttl)
    return _LB[policy], HashOn(source_ip=True)
