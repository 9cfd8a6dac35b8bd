"""Golden metrics from Envoy's own stats access logger: no code on the request path.

Each HTTP connection manager and TCP proxy of a sidecar's capture listeners gets an
``envoy.access_loggers.stats`` logger. At the end of every request (HTTP) or connection (TCP)
it increments counters and records a histogram whose *tags* are Envoy format strings,
evaluated per request: a literal the control plane compiled in (the sidecar's own workload,
the Service a chain leads to), a verified peer identity (``%DOWNSTREAM_PEER_URI_SAN%``), the
endpoint metadata the control plane attached to each endpoint (the destination's workload and
namespace), or the response code. Envoy's ``/stats/prometheus`` (15090) then serves them, with
its ``envoy_`` prefix:

=================================================  =========  =================================
metric                                             type       value
=================================================  =========  =================================
``envoy_sidemesh_request_duration_milliseconds``   histogram  first request byte to last
                                                              response byte; its ``_count`` is
                                                              the number of requests
``envoy_sidemesh_request_bytes_total``             counter    request body bytes
``envoy_sidemesh_response_bytes_total``            counter    response body bytes
``envoy_sidemesh_tcp_connections_closed_total``    counter    TCP connections (counted at close)
``envoy_sidemesh_tcp_received_bytes_total``        counter    bytes from the connection's opener
``envoy_sidemesh_tcp_sent_bytes_total``            counter    bytes to the connection's opener
=================================================  =========  =================================

What a request costs is set by how many (stat, label) pairs it records: Envoy formats every
label of every stat on every request and builds a stat name from them. So requests are counted
by the duration histogram (its ``_count``, complete with every label), not by a second counter
with the same labels; the byte counters carry only the edge (:data:`EDGE_LABELS`: who called
whom, through which Service, over mTLS or not), not the answer's code, flags or the
principals; and the three labels that name the sidecar itself (:data:`OWN_LABELS`: its
workload, namespace and principal, the source side's on an outbound chain, the destination
side's on an inbound one) are not recorded by Envoy at all. They are the same on every series
a sidecar reports for one ``reporter``, so the agent adds them when the sidecar is scraped
(:func:`with_own_labels`), as Prometheus adds a target's labels. That leaves 19 pairs per HTTP
request, where a request counter and byte counters with every label would make 48. The price
of counting by the histogram: it reaches ``/stats/prometheus`` at Envoy's stats flush (every
5 s), so a request shows up in the count up to 5 s after it ended.

The labels, where each comes from, and why the cardinality stays bounded are in
:data:`HTTP_LABELS`, :data:`TCP_LABELS` and ``docs/telemetry.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

__all__ = [
    "EDGE_LABELS",
    "HTTP_LABELS",
    "METRIC_PREFIX",
    "OWN_LABELS",
    "PROMETHEUS_NAMES",
    "REQUESTS",
    "TCP_LABELS",
    "own_labels",
    "stats_logger",
    "with_own_labels",
]

_TYPE = "@type"
_T_STATS = "type.googleapis.com/envoy.extensions.access_loggers.stats.v3.Config"
#: Envoy scopes the logger's stats under this name; Prometheus sees ``envoy_sidemesh_…``.
METRIC_PREFIX: Final = "sidemesh"

#: Labels of HTTP metrics, in order. Identity labels are filled per chain (see instrument).
HTTP_LABELS: Final = (
    "reporter",
    "source_workload",
    "source_namespace",
    "source_principal",
    "destination_workload",
    "destination_namespace",
    "destination_principal",
    "destination_service",
    "connection_security_policy",
    "response_code",
    "grpc_status",
    "response_flags",
)
#: Labels of TCP metrics: the same without the HTTP-only ones.
TCP_LABELS: Final = tuple(x for x in HTTP_LABELS if x not in ("response_code", "grpc_status"))

#: Labels of the HTTP byte counters: the edge, without the answer and the peer's principal
#: (the agent adds the reporting sidecar's own principal with its other own labels).
EDGE_LABELS: Final = (
    "reporter",
    "source_workload",
    "source_namespace",
    "destination_workload",
    "destination_namespace",
    "destination_service",
    "connection_security_policy",
)

#: The labels that name the reporting sidecar itself, by ``reporter``: the agent adds them at
#: scrape time (:func:`with_own_labels`), Envoy does not record them.
OWN_LABELS: Final = {
    "source": ("source_workload", "source_namespace", "source_principal"),
    "destination": ("destination_workload", "destination_namespace", "destination_principal"),
}

#: Per-request values (the rest of the labels are per chain).
_PER_REQUEST: Final = {
    "response_code": "%RESPONSE_CODE%",
    "grpc_status": "%GRPC_STATUS_NUMBER%",
    "response_flags": "%RESPONSE_FLAGS%",
}

#: (stat name, kind, value format, labels) per protocol; the Prometheus names follow.
_HTTP_STATS: Final = (
    ("request_duration_milliseconds", "histogram", "%DURATION%", HTTP_LABELS),
    ("request_bytes_total", "counter", "%BYTES_RECEIVED%", EDGE_LABELS),
    ("response_bytes_total", "counter", "%BYTES_SENT%", EDGE_LABELS),
)
_TCP_STATS: Final = (
    ("tcp_connections_closed_total", "counter", None, TCP_LABELS),
    ("tcp_received_bytes_total", "counter", "%BYTES_RECEIVED%", TCP_LABELS),
    ("tcp_sent_bytes_total", "counter", "%BYTES_SENT%", TCP_LABELS),
)
#: What a sidecar's /stats/prometheus calls each metric (dashboards and `sidemesh top`).
PROMETHEUS_NAMES: Final = {
    name: f"envoy_{METRIC_PREFIX}_{name}" for name, _, _, _ in (*_HTTP_STATS, *_TCP_STATS)
}
#: HTTP/gRPC requests: the duration histogram's count.
REQUESTS: Final = PROMETHEUS_NAMES["request_duration_milliseconds"] + "_count"


def stats_logger(protocol: str, labels: Mapping[str, str]) -> dict[str, Any]:
    """The stats access logger of one chain. ``protocol``: ``http`` or ``tcp``; ``labels``:
    each per-chain label's format string (literals or Envoy operators). ``reporter`` comes
    first, and the sidecar's own labels for that reporter are left to the agent."""
    names = HTTP_LABELS if protocol == "http" else TCP_LABELS
    values = {**labels, **_PER_REQUEST}
    missing = [n for n in names if n not in values]
    if missing:
        raise ValueError(f"telemetry labels without a value: {', '.join(missing)}")
    counters: list[dict[str, Any]] = []
    histograms: list[dict[str, Any]] = []
    own = OWN_LABELS.get(values.get("reporter", ""), ())
    for name, kind, value, labelled in _HTTP_STATS if protocol == "http" else _TCP_STATS:
        tags = [
            {"name": n, "value_format": _non_empty(values[n])} for n in labelled if n not in own
        ]
        stat = {"name": name, "tags": tags}
        if kind == "histogram":
            histograms.append({"stat": stat, "unit": "Milliseconds", "value_format": value})
        elif value is None:
            counters.append({"stat": stat, "value_fixed": 1})
        else:
            counters.append({"stat": stat, "value_format": value})
    config: dict[str, Any] = {
        _TYPE: _T_STATS,
        # Envoy 1.40 calls stat_prefix deprecated; its successor is a stats scope.
        "stats_scope": {"prefix": METRIC_PREFIX},
        "counters": counters,
    }
    if histograms:
        config["histograms"] = histograms
    return {"name": "envoy.access_loggers.stats", "typed_config": config}


def _non_empty(value: str) -> str:
    # Envoy refuses an empty tag format; a label the chain cannot know says so.
    return value or "unknown"


def own_labels(workload: str, namespace: str, principal: str) -> dict[str, dict[str, str]]:
    """What :func:`with_own_labels` adds for a sidecar, by ``reporter``."""
    values = (workload, namespace, principal)
    return {
        reporter: dict(zip(names, values, strict=True)) for reporter, names in OWN_LABELS.items()
    }


def with_own_labels(text: str, own: Mapping[str, Mapping[str, str]]) -> str:
    """A sidecar's Prometheus text with its own labels (:func:`own_labels`) added to each
    golden-metric series, after its ``reporter`` (always the first label). A label the series
    already has is left as it is (a control plane that still has Envoy record it)."""
    prefix = f"envoy_{METRIC_PREFIX}_"
    markers = {
        '{reporter="' + reporter + '"': [
            (f',{k}="', f',{k}="{_escape(v)}"') for k, v in labels.items()
        ]
        for reporter, labels in own.items()
    }
    out = []
    for line in text.splitlines(keepends=True):
        if line.startswith(prefix):
            for marker, added in markers.items():
                at = line.find(marker)
                if at != -1:
                    extra = "".join(pair for key, pair in added if key not in line)
                    cut = at + len(marker)
                    line = line[:cut] + extra + line[cut:]
                    break
        out.append(line)
    return "".join(out)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
