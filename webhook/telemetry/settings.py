"""Telemetry settings: the mesh config's defaults, a pod's own overrides, and the facts about a
sidecar its telemetry is labelled with. Standard library only (the mesh config validates
with :func:`parse_access_log`, and the CNI plugin imports the mesh config).

Access-log policy, the same syntax in the mesh config (``telemetry.access_log``), in the
annotation ``telemetry.sidemesh.io/access-log`` of a Namespace (its pods' default) and of a pod
(which wins over both):

=========  ============================================================================
value      what is written (one JSON line per request or connection, to the proxy's stdout)
=========  ============================================================================
``off``    nothing
``errors`` failed ones only: HTTP 5xx, and anything Envoy flagged (no upstream, reset,
           timeout, refused connect …)
``N%``     failed ones, plus N percent of the others (0 < N <= 100; ``100%`` logs all)
=========  ============================================================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "ACCESS_LOG_ANNOTATION",
    "ANNOTATION_PREFIX",
    "AccessLogPolicy",
    "ProxyFacts",
    "namespace_settings",
    "parse_access_log",
]

ANNOTATION_PREFIX: Final = "telemetry.sidemesh.io/"
ACCESS_LOG_ANNOTATION: Final = f"{ANNOTATION_PREFIX}access-log"


@dataclass(frozen=True)
class AccessLogPolicy:
    """``enabled`` False: no access log at all; else failures plus ``percent`` of the rest."""

    enabled: bool
    percent: float = 0.0


def parse_access_log(value: str) -> AccessLogPolicy:
    """``off``, ``errors`` or ``N%``; ValueError saying what is accepted otherwise."""
    text = value.strip().lower()
    if text == "off":
        return AccessLogPolicy(False)
    if text == "errors":
        return AccessLogPolicy(True, 0.0)
    if text.endswith("%"):
        try:
            percent = float(text[:-1])
        except ValueError:
            percent = -1.0
        if 0 < percent <= 100:
            return AccessLogPolicy(True, percent)
    raise ValueError(f"access log {value!r}: expected off, errors, or a percentage like 5%")


@dataclass(frozen=True)
class ProxyFacts:
    """Who a sidecar is, as its own metrics and logs name it (the control plane knows it)."""

    workload: str
    namespace: str
    principal: str
    access_log: AccessLogPolicy

    @classmethod
    def of(
        cls,
        *,
        workload: str,
        namespace: str,
        principal: str,
        annotations: Mapping[str, str],
        default_access_log: str,
        namespace_annotations: Mapping[str, str] | None = None,
    ) -> ProxyFacts:
        """The pod's annotation wins over its namespace's, which wins over the mesh default;
        an annotation that does not parse is skipped (the next one down applies; `sidemesh
        proxy-config` shows what a sidecar got)."""
        policy = parse_access_log(default_access_log)
        for source in (namespace_annotations or {}, annotations):
            raw = source.get(ACCESS_LOG_ANNOTATION)
            if raw is not None:
                with contextlib.suppress(ValueError):
                    policy = parse_access_log(raw)
        return cls(workload, namespace, principal, policy)


def namespace_settings(namespaces: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, str]]:
    """Each Namespace object's ``telemetry.sidemesh.io/…`` annotations, by name (namespaces
    without any left out)."""
    out: dict[str, Mapping[str, str]] = {}
    for obj in namespaces:
        meta = obj.get("metadata") or {}
        ann = meta.get("annotations") or {}
        own = {str(k): str(v) for k, v in ann.items() if str(k).startswith(ANNOTATION_PREFIX)}
        if own and isinstance(meta.get("name"), str):
            out[meta["name"]] = own
    return out
