"""The CA's Prometheus metrics (``sidemesh_ca_`` prefix), one set per registry.

``certificates_issued_total``, ``refusals_total{reason}`` and ``signing_seconds`` (CSR parse +
verify + sign + PEM). The process-wide default registry gets one shared set, so a second
router built in the same process (tests, a restart of the app) does not register twice.
"""

from __future__ import annotations

import threading

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

__all__ = ["SIGNING_BUCKETS", "CAMetrics", "metrics_for"]

SIGNING_BUCKETS = (0.0001, 0.0002, 0.0003, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05)


class CAMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.issued = Counter(
            "sidemesh_ca_certificates_issued",
            "Workload certificates issued.",
            registry=registry,
        )
        self.refused = Counter(
            "sidemesh_ca_refusals",
            "Certificate requests refused, by reason.",
            ["reason"],
            registry=registry,
        )
        self.signing = Histogram(
            "sidemesh_ca_signing_seconds",
            "Time to sign one workload certificate (CSR parse, verify, sign, PEM).",
            buckets=SIGNING_BUCKETS,
            registry=registry,
        )


_default_metrics: CAMetrics | None = None
_default_lock = threading.Lock()


def metrics_for(registry: CollectorRegistry | None) -> CAMetrics:
    """One CAMetrics per registry; the process-wide default registry is shared."""
    global _default_metrics
    if registry is not None and registry is not REGISTRY:
        return CAMetrics(registry)
    with _default_lock:
        if _default_metrics is None:
            _default_metrics = CAMetrics(REGISTRY)
        return _default_metrics
