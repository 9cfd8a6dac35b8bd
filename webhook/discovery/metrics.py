"""The control plane's Prometheus metrics (its own registry: one process, one exposition)."""

from __future__ import annotations

from functools import cache
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = [
    "CONNECTED",
    "CONVERGENCE",
    "DEBOUNCED",
    "FLUSHES",
    "LEARNED",
    "NACKS",
    "PUSHES",
    "PUSH_BYTES",
    "REBUILD",
    "REGISTRY",
    "by_type",
]

REGISTRY = CollectorRegistry()
_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)

PUSHES = Counter("sidemesh_xds_pushes", "Delta xDS responses sent", ["type"], registry=REGISTRY)
PUSH_BYTES = Counter(
    "sidemesh_xds_push_bytes", "Serialised resource bytes sent", ["type"], registry=REGISTRY
)
NACKS = Counter("sidemesh_xds_nacks", "Responses a proxy rejected", ["type"], registry=REGISTRY)
CONNECTED = Gauge("sidemesh_xds_connected_proxies", "Open ADS streams", registry=REGISTRY)
CONVERGENCE = Histogram(
    "sidemesh_xds_ack_seconds",
    "From sending a response to the proxy's ACK",
    ["type"],
    buckets=_BUCKETS,
    registry=REGISTRY,
)
REBUILD = Histogram(
    "sidemesh_xds_rebuild_seconds",
    "Rebuilding the model and the shared resources after a change (push latency, our side)",
    ["cause"],
    buckets=_BUCKETS,
    registry=REGISTRY,
)
DEBOUNCED = Counter(
    "sidemesh_xds_debounced_events",
    "Config change events merged by the debounce before a push",
    registry=REGISTRY,
)
FLUSHES = Counter("sidemesh_xds_flushes", "Pushes started, by cause", ["cause"], registry=REGISTRY)
LEARNED = Counter(
    "sidemesh_xds_learned_dependencies",
    "Services a scoped sidecar called without declaring them (on-demand cluster requests)",
    registry=REGISTRY,
)


@cache
def by_type(metric: Any, type_url: str) -> Any:
    """``metric``'s child for one resource type (label ``type``: the message name). Looked up
    once: a label lookup takes a lock, and pushes and ACKs come once per proxy."""
    return metric.labels(type_url.rsplit(".", 1)[-1])
