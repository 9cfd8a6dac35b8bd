"""Rate-limit policies as the compiler needs them: parsed, validated, frozen. Pure.

The resource::

    apiVersion: sidemesh.io/v1alpha1
    kind: RateLimitPolicy
    metadata: {name: orders, namespace: shop}
    spec:
      selector: {matchLabels: {app: orders}}   # absent: every workload of the namespace
      failureMode: Allow                       # Global limits when the rate-limit service or
                                               # its Redis is down: Allow (fail open) | Deny
      limits:
      - requests: 100                          # per unit of time ...
        per: minute                            # second | minute | hour
        scope: Global                          # Global: one budget shared by every replica
                                               # (the rate-limit service, Redis); Local: each
                                               # sidecar its own token bucket
        perCaller: true                        # one budget per caller identity (SPIFFE id;
                                               # plaintext callers share one)
        match: {paths: [/api/*], methods: [POST]}   # absent: every request

A Global limit is a fixed window: at most ``requests`` in each calendar ``per`` (a burst of up
to twice that can straddle a window edge). A Local limit is a token bucket of ``requests``
tokens refilled every ``per``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

__all__ = [
    "KIND",
    "UNITS",
    "Limit",
    "LimitError",
    "RateLimitPolicy",
    "parse_limit_policies",
    "parse_limit_policy",
]

KIND: Final = "RateLimitPolicy"
#: Seconds per unit.
UNITS: Final = {"second": 1, "minute": 60, "hour": 3600}
_METHOD = re.compile(r"^[A-Z]+$")


class LimitError(ValueError):
    """A RateLimitPolicy that cannot be enforced: the message names the object and field."""


@dataclass(frozen=True)
class Limit:
    requests: int
    per: Literal["second", "minute", "hour"]
    scope: Literal["Global", "Local"]
    per_caller: bool = False
    paths: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()


@dataclass(frozen=True)
class RateLimitPolicy:
    namespace: str
    name: str
    limits: tuple[Limit, ...]
    fail_open: bool = True
    selector: Mapping[str, str] | None = None

    @property
    def id(self) -> str:
        return f"{self.namespace}/{self.name}"

    def limit_ids(self) -> list[str]:
        """The name of each limit (in descriptors, stats and the service's metrics)."""
        if len(self.limits) == 1:
            return [self.id]
        return [f"{self.id}#{i}" for i in range(1, len(self.limits) + 1)]

    def selects(self, namespace: str, labels: Mapping[str, str]) -> bool:
        if namespace != self.namespace:
            return False
        return self.selector is None or all(labels.get(k) == v for k, v in self.selector.items())


def parse_limit_policies(
    objects: Iterable[Mapping[str, Any]],
) -> tuple[tuple[RateLimitPolicy, ...], dict[str, str]]:
    good: list[RateLimitPolicy] = []
    bad: dict[str, str] = {}
    for obj in objects:
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), Mapping) else {}
        assert isinstance(meta, Mapping)
        try:
            good.append(parse_limit_policy(obj))
        except LimitError as exc:
            bad[f"{meta.get('namespace', '')}/{meta.get('name', '')}"] = str(exc)
    good.sort(key=lambda p: p.id)
    return tuple(good), bad


def parse_limit_policy(obj: Mapping[str, Any]) -> RateLimitPolicy:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping) or not meta.get("name") or not meta.get("namespace"):
        raise LimitError("RateLimitPolicy: metadata.name and metadata.namespace are required")
    where = f"RateLimitPolicy {meta['namespace']}/{meta['name']}"
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        raise LimitError(f"{where}: spec must be a map, got {spec!r}")
    mode = spec.get("failureMode", "Allow")
    if mode not in ("Allow", "Deny"):
        raise LimitError(f"{where}: spec.failureMode must be Allow or Deny: {mode!r}")
    raw = spec.get("limits")
    if not isinstance(raw, list) or not raw:
        raise LimitError(f"{where}: spec.limits must be a non-empty list, got {raw!r}")
    limits = tuple(_limit(item, f"{where}: spec.limits[{i}]") for i, item in enumerate(raw))
    selector = spec.get("selector")
    labels: Mapping[str, str] | None = None
    if selector is not None:
        ml = selector.get("matchLabels") if isinstance(selector, Mapping) else None
        if not isinstance(ml, Mapping) or set(selector) - {"matchLabels"}:
            raise LimitError(f"{where}: spec.selector supports matchLabels only: {selector!r}")
        labels = {str(k): str(v) for k, v in ml.items()}
    return RateLimitPolicy(
        str(meta["namespace"]), str(meta["name"]), limits, mode == "Allow", labels
    )


def _limit(raw: Any, where: str) -> Limit:
    if not isinstance(raw, Mapping):
        raise LimitError(f"{where} must be a map, got {raw!r}")
    unknown = set(raw) - {"requests", "per", "scope", "perCaller", "match"}
    if unknown:
        raise LimitError(f"{where}: unknown field(s) {sorted(unknown)}")
    requests = raw.get("requests")
    if isinstance(requests, bool) or not isinstance(requests, int) or requests < 1:
        raise LimitError(f"{where}.requests must be a positive integer: {requests!r}")
    per = raw.get("per")
    if per not in UNITS:
        raise LimitError(f"{where}.per must be one of {', '.join(UNITS)}: {per!r}")
    scope = raw.get("scope", "Global")
    if scope not in ("Global", "Local"):
        raise LimitError(f"{where}.scope must be Global or Local: {scope!r}")
    per_caller = raw.get("perCaller", False)
    if not isinstance(per_caller, bool):
        raise LimitError(f"{where}.perCaller must be true or false: {per_caller!r}")
    if per_caller and scope == "Local":
        raise LimitError(f"{where}.perCaller needs scope Global (Local limits are per sidecar)")
    match = raw.get("match") or {}
    if not isinstance(match, Mapping) or set(match) - {"paths", "methods"}:
        raise LimitError(f"{where}.match supports paths and methods: {match!r}")
    paths = match.get("paths") or []
    methods = match.get("methods") or []
    for path in paths:
        if not isinstance(path, str) or not path.startswith("/") or "*" in path[:-1]:
            raise LimitError(f"{where}.match.paths: {path!r} (an exact path or a prefix*)")
    for method in methods:
        if not isinstance(method, str) or not _METHOD.match(method):
            raise LimitError(f"{where}.match.methods: {method!r} is not an HTTP method")
    return Limit(requests, per, scope, per_caller, tuple(paths), tuple(methods))
