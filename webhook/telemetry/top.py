"""``sidemesh top``'s arithmetic: golden signals per workload from the sidecars' metrics.

Pure: it gets the samples of each scrape (:mod:`webhook.telemetry.promtext`) and returns rows.
Each workload's row is what its *own* sidecars saw as the destination (``reporter=
"destination"``), as ``linkerd viz stat`` reports a deployment: requests it answered, the share
that was not a 5xx, requests per second, and latency percentiles estimated from the duration
histogram the way Prometheus' ``histogram_quantile`` does (linear within a bucket). With two
scrapes the numbers cover the time between them; with one, the sidecars' lifetime
(``envoy_server_uptime``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from webhook.telemetry.metrics import PROMETHEUS_NAMES, REQUESTS
from webhook.telemetry.promtext import Sample

__all__ = ["Row", "quantile", "render", "rows"]

_BUCKETS = PROMETHEUS_NAMES["request_duration_milliseconds"] + "_bucket"
_TCP = PROMETHEUS_NAMES["tcp_connections_closed_total"]
_UPTIME = "envoy_server_uptime"

Key = tuple[str, str]  # (namespace, workload)


@dataclass(frozen=True)
class Row:
    namespace: str
    workload: str
    requests: float
    success: float | None  # share of non-5xx answers; None without requests
    rps: float
    p50: float | None
    p95: float | None
    p99: float | None
    tcp_connections: float


@dataclass
class _Acc:
    requests: float = 0.0
    failed: float = 0.0
    tcp: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)


def rows(
    now: Sequence[Sequence[Sample]],
    before: Sequence[Sequence[Sample]] | None = None,
    seconds: float | None = None,
) -> list[Row]:
    """One row per destination workload. ``now``: each sidecar's samples; ``before``: the same
    sidecars' samples ``seconds`` earlier (None: since each sidecar started)."""
    current = _accumulate(now)
    if before is not None:
        previous = _accumulate(before)
        for key, acc in current.items():
            old = previous.get(key)
            if old is not None:
                acc.requests -= old.requests
                acc.failed -= old.failed
                acc.tcp -= old.tcp
                acc.buckets = {le: n - old.buckets.get(le, 0.0) for le, n in acc.buckets.items()}
        span = seconds or 0.0
    else:
        span = max((_uptime(s) for s in now), default=0.0)
    out = []
    for (namespace, workload), acc in sorted(current.items()):
        out.append(
            Row(
                namespace=namespace,
                workload=workload,
                requests=acc.requests,
                success=(acc.requests - acc.failed) / acc.requests if acc.requests else None,
                rps=acc.requests / span if span > 0 else 0.0,
                p50=quantile(0.50, acc.buckets),
                p95=quantile(0.95, acc.buckets),
                p99=quantile(0.99, acc.buckets),
                tcp_connections=acc.tcp,
            )
        )
    return out


def quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """``histogram_quantile``: cumulative counts by upper bound (``+Inf`` included)."""
    ordered = sorted(buckets.items())
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in ordered:
        if count >= rank:
            if math.isinf(upper):
                return lower  # beyond the last finite bound: the best we can say
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def render(table: Iterable[Row]) -> str:
    head = ("NAMESPACE", "WORKLOAD", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95",
            "LATENCY_P99", "TCP_CONN")  # fmt: skip
    lines: list[tuple[str, ...]] = [head]
    for r in table:
        lines.append(
            (
                r.namespace,
                r.workload,
                "-" if r.success is None else f"{100 * r.success:.2f}%",
                f"{r.rps:.1f}",
                *(("-" if v is None else f"{v:g}ms") for v in (r.p50, r.p95, r.p99)),
                f"{r.tcp_connections:g}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)  # fmt: skip


def _accumulate(scrapes: Sequence[Sequence[Sample]]) -> dict[Key, _Acc]:
    out: dict[Key, _Acc] = {}
    for samples in scrapes:
        for s in samples:
            if s.labels.get("reporter") != "destination":
                continue
            key = (
                s.labels.get("destination_namespace", ""),
                s.labels.get("destination_workload", ""),
            )
            if s.name == REQUESTS:
                acc = out.setdefault(key, _Acc())
                acc.requests += s.value
                if s.labels.get("response_code", "").startswith("5"):
                    acc.failed += s.value
            elif s.name == _BUCKETS:
                acc = out.setdefault(key, _Acc())
                le = float(s.labels.get("le", "+Inf").replace("+Inf", "inf"))
                acc.buckets[le] = acc.buckets.get(le, 0.0) + s.value
            elif s.name == _TCP:
                out.setdefault(key, _Acc()).tcp += s.value
    return out


def _uptime(samples: Sequence[Sample]) -> float:
    return next((s.value for s in samples if s.name == _UPTIME), 0.0)
