"""Prometheus metrics of the webhook.

| metric                                            | type      | labels          |
|---------------------------------------------------|-----------|-----------------|
| ``sidemesh_admission_requests_total``             | counter   | result, reason  |
| ``sidemesh_admission_duration_seconds``           | histogram | result          |
| ``sidemesh_serving_cert_expiry_timestamp_seconds``| gauge     |                 |
| ``sidemesh_serving_cert_reloads_total``           | counter   | result          |
| ``sidemesh_trust_bundle_reloads_total``           | counter   | result          |
| ``sidemesh_build_info``                           | gauge = 1 | version, python |
| ``sidemesh_http_refusals_total``                  | counter   | reason          |
| ``sidemesh_http_connections``                     | gauge     |                 |
| ``sidemesh_unexpected_errors_total``              | counter   | where           |

``result`` is ``injected``, ``unchanged``, ``skipped``, ``denied`` (pod refused with a
message) or ``invalid`` (HTTP 4xx, not a review); ``reason`` is a stable short string
(``host-network``, ``bad-annotation``, ``too-large`` …), so label cardinality stays bounded.

``sidemesh_http_refusals_total`` counts what the client limits (:mod:`webhook.server.limits`)
refused or closed, by reason (``header-too-large``, ``header-timeout``, ``connection-limit`` …).
``sidemesh_unexpected_errors_total`` counts exceptions that reached a generic handler: each one
is a bug (every expected problem is a typed refusal with its own reason), so it stays at 0.

The duration buckets start far below the API server's own webhook latency buckets: a review
is pure CPU work and finishes well inside the API server's smallest bucket, so coarse buckets
would put every review into the first one and hide every change.

With ``sidemesh serve --workers N`` each worker is its own process; the supervisor points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory, and every scrape then sums all workers
(:func:`render` detects the mode).
"""

from __future__ import annotations

import os
import platform
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess as _multiprocess,
)

from webhook import __version__

__all__ = ["DURATION_BUCKETS", "MULTIPROC_ENV", "Metrics", "render"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DURATION_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.1,
    0.5,
    2.5,
)


class Metrics:
    """The webhook's metrics in their own registry (one per app, so tests stay independent)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """One declaration per metric, in the order of the module's table.

        Long, but only declarations: a flat list shows every attribute and its metric in one
        place, where helpers that each set a few attributes would hide where each comes from.
        """
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "sidemesh_admission_requests",
            "Admission reviews answered, by result and reason.",
            ["result", "reason"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "sidemesh_admission_duration_seconds",
            "Time to answer one admission review, from request body to response bytes.",
            ["result"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.cert_expiry = Gauge(
            "sidemesh_serving_cert_expiry_timestamp_seconds",
            "notAfter of the serving certificate in use (Unix time).",
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        self.cert_reloads = Counter(
            "sidemesh_serving_cert_reloads_total",
            "Serving certificate reloads after the files changed, by result.",
            ["result"],
            registry=self.registry,
        )
        self.trust_reloads = Counter(
            "sidemesh_trust_bundle_reloads_total",
            "Reloads of the trust bundle and CA signer (ca.crt/ca.key) after the files "
            "changed, by result (failure: the old ones stay in use).",
            ["result"],
            registry=self.registry,
        )
        self.build_info = Gauge(
            "sidemesh_build_info",
            "Always 1; the labels say which sidemesh runs.",
            ["version", "python"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self.http_refusals = Counter(
            "sidemesh_http_refusals",
            "Requests refused or connections closed by the client limits, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.connections = Gauge(
            "sidemesh_http_connections",
            "Open client connections (after the TLS handshake).",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.unexpected = Counter(
            "sidemesh_unexpected_errors",
            "Exceptions that reached a generic handler (a bug: expected problems are typed "
            "refusals), by where they happened.",
            ["where"],
            registry=self.registry,
        )
        # Labelled children, looked up once: ``labels()`` takes a lock and builds a key on
        # every call, a measurable share of a review. Label values come from fixed sets.
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}

    def observe(self, result: str, reason: str, seconds: float) -> None:
        children = self._children.get((result, reason))
        if children is None:
            children = (self.requests.labels(result, reason), self.duration.labels(result))
            self._children[(result, reason)] = children
        children[0].inc()
        children[1].observe(seconds)

    def cert_loaded(self, not_after: float, *, reloaded: bool) -> None:
        self.cert_expiry.set(not_after)
        if reloaded:
            self.cert_reloads.labels("success").inc()

    def cert_reload_failed(self) -> None:
        self.cert_reloads.labels("failure").inc()

    def trust_reloaded(self, ok: bool) -> None:
        self.trust_reloads.labels("success" if ok else "failure").inc()

    def render(self) -> tuple[bytes, str]:
        return render(self.registry)


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The exposition text: this process's registry, or the sum of all workers' files."""
    if os.environ.get(MULTIPROC_ENV):
        merged = CollectorRegistry()
        _multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        return generate_latest(merged), CONTENT_TYPE_LATEST
    return generate_latest(registry), CONTENT_TYPE_LATEST
