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
label of every stat on every request, builds a stat name from them and looks it up; and an
HTTP response is written to the socket only after its access loggers ran, so this is latency
as well as CPU. So a label that does not change is not Envoy's to record:

* requests are counted by the duration histogram (its ``_count``, complete with every label),
  not by a second counter with the same labels;
* the byte counters carry only who called whom through which Service (:data:`EDGE_LABELS`),
  not the answer's code, flags, the transport or the peer's principal;
* the labels that name the sidecar itself (:data:`OWN_LABELS`: its workload, namespace and
  principal; the source side's on an outbound chain, the destination side's on an inbound
  one) and ``reporter`` are the same on every series of one side, so each side records into
  a stats scope of its own (:data:`SCOPES`) and the agent turns scope into labels when the
  sidecar is scraped (:func:`finish_scrape`), as Prometheus adds a target's labels.

That leaves 14 pairs per HTTP request, where a request counter and byte counters with every
label would make 48. The price of counting by the histogram: it reaches ``/stats/prometheus``
at Envoy's stats flush (every 5 s), so a request shows up in the count up to 5 s after it
ended.

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
    "SCOPES",
    "TCP_LABELS",
    "finish_scrape",
    "own_labels",
    "stats_logger",
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

#: Labels of the HTTP byte counters: who called whom through which Service, without the
#: answer, the transport or the peer's principal (the agent adds the reporting sidecar's own
#: principal with its other own labels).
EDGE_LABELS: Final = (
    "reporter",
    "source_workload",
    "source_namespace",
    "destination_workload",
    "destination_namespace",
    "destination_service",
)

#: The labels that name the reporting sidecar itself, by ``reporter``: the agent adds them at
#: scrape time (:func:`finish_scrape`), Envoy does not record them.
OWN_LABELS: Final = {
    "source": ("source_workload", "source_namespace", "source_principal"),
    "destination": ("destination_workload", "destination_namespace", "destination_principal"),
}
#: Envoy records each side's metrics under a stats scope of its own, and the agent turns the
#: scope into ``reporter`` (so ``reporter`` is not a label Envoy formats on every request):
#: ``envoy_sidemesh_out_…`` and ``envoy_sidemesh_in_…`` on the admin port are
#: ``envoy_sidemesh_…{reporter="source"|"destination"}`` on 15090.
SCOPES: Final = {"source": f"{METRIC_PREFIX}_out", "destination": f"{METRIC_PREFIX}_in"}

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
    each per-chain label's format string (literals or Envoy operators). ``reporter`` (a
    literal, ``source`` or ``destination``) picks the stats scope, and the sidecar's own labels
    for that reporter are left to the agent (:func:`finish_scrape`)."""
    names = HTTP_LABELS if protocol == "http" else TCP_LABELS
    values = {**labels, **_PER_REQUEST}
    missing = [n for n in names if n not in values]
    if missing:
        raise ValueError(f"telemetry labels without a value: {', '.join(missing)}")
    counters: list[dict[str, Any]] = []
    histograms: list[dict[str, Any]] = []
    reporter = values["reporter"]
    if reporter not in SCOPES:
        raise ValueError(f"reporter must be source or destination, not {reporter!r}")
    kept = [n for n in names if n != "reporter" and n not in OWN_LABELS[reporter]]
    for name, kind, value, labelled in _HTTP_STATS if protocol == "http" else _TCP_STATS:
        tags = [{"name": n, "value_format": _non_empty(values[n])} for n in kept if n in labelled]
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
        "stats_scope": {"prefix": SCOPES[reporter]},
        "counters": counters,
    }
    if histograms:
        config["histograms"] = histograms
    return {"name": "envoy.access_loggers.stats", "typed_config": config}


def _non_empty(value: str) -> str:
    # Envoy refuses an empty tag format; a label the chain cannot know says so.
    return value or "unknown"


def own_labels(workload: str, namespace: str, principal: str) -> dict[str, dict[str, str]]:
    """What :func:`finish_scrape` adds for a sidecar, by ``reporter``."""
    values = (workload, namespace, principal)
    return {
        reporter: dict(zip(names, values, strict=True)) for reporter, names in OWN_LABELS.items()
    }


def finish_scrape(text: str, own: Mapping[str, Mapping[str, str]]) -> str:
    """A sidecar's ``/stats/prometheus`` as Prometheus should see it: each metric family of a
    side's scope (:data:`SCOPES`) renamed to the golden metric, its samples labelled with
    ``reporter`` and the sidecar's own labels (:func:`own_labels`), and the two sides' samples
    of one metric merged under one ``# TYPE`` line where the first of them stood. Everything
    else passes through as Envoy wrote it. (A series from a control plane that still records
    ``reporter`` in the plain ``sidemesh`` scope gets the own labels it lacks after its
    ``reporter``.)"""
    renames = {
        f"envoy_{scope}_": (reporter, _label_text({"reporter": reporter, **own.get(reporter, {})}))
        for reporter, scope in SCOPES.items()
    }
    golden = f"envoy_{METRIC_PREFIX}_"
    families: dict[str, list[str]] = {}
    out: list[str | list[str]] = []
    for block in _blocks(text):
        head = block[0]
        name = head.split()[2] if head.startswith("# TYPE ") and len(head.split()) >= 3 else ""
        for prefix, (_reporter, labels) in renames.items():
            if name.startswith(prefix):
                base = golden + name[len(prefix) :]
                samples = [_relabel(line, name, base, labels) for line in block[1:]]
                if base in families:
                    families[base].extend(samples)
                else:
                    families[base] = [f"# TYPE {base} {head.split()[3]}\n", *samples]
                    out.append(families[base])
                break
        else:
            if name.startswith(golden):
                block = [_with_own(line, own) for line in block]
            out.append(block)
    return "".join(line for part in out for line in part)


def _blocks(text: str) -> list[list[str]]:
    """Envoy's Prometheus text cut at each ``# TYPE`` line (a block: its line and samples)."""
    blocks: list[list[str]] = [[]]
    for line in text.splitlines(keepends=True):
        if line.startswith("# TYPE ") and blocks[-1]:
            blocks.append([])
        blocks[-1].append(line if line.endswith("\n") else line + "\n")
    return [b for b in blocks if b]


def _relabel(line: str, name: str, base: str, labels: str) -> str:
    """``name…{a="b"} 1`` → ``base…{<labels>,a="b"} 1`` (a sample of ``name``'s family)."""
    if not line.startswith(name):
        return line
    rest = line[len(name) :]
    suffix, brace, tail = rest.partition("{")
    if brace:
        sep = "" if tail.startswith("}") else ","
        return f"{base}{suffix}{{{labels}{sep}{tail}"
    suffix, space, value = rest.partition(" ")
    return f"{base}{suffix}{{{labels}}}{space}{value}"


def _with_own(line: str, own: Mapping[str, Mapping[str, str]]) -> str:
    for reporter, labels in own.items():
        marker = '{reporter="' + reporter + '"'
        at = line.find(marker)
        if at != -1:
            extra = "".join(
                f',{k}="{_escape(v)}"' for k, v in labels.items() if f',{k}="' not in line
            )
            cut = at + len(marker)
            return line[:cut] + extra + line[cut:]
    return line


def _label_text(labels: Mapping[str, str]) -> str:
    return ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
