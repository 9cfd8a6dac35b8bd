"""Telemetry end to end: real Envoys programmed over ADS report golden metrics, access logs
and traces for traffic between meshed pods, in network namespaces.

    node 10.200.0.1 ── cp      sidemesh serve (webhook + CA), sidemesh discovery
                     ├─ client meshed (Deployment "client")
                     ├─ web    meshed (Deployment "web"), HTTP on 8080, logs every request
                     └─ db     meshed, STRICT, a server-first protocol on 3306 (mysql)

The client calls the ``web`` Service (some requests fail with 500) and the ``db`` Service (TCP);
each sidecar's ``/stats/prometheus`` — scraped from the node, like Prometheus does — must count
exactly those requests and connections, under the right source and destination.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import envoy_binary, require_root, require_tools
from tests.support.meshlab import SIDEMESH, app, checked_lab
from tests.support.telemetrylab import DB, WEB, Lab, start
from webhook.telemetry import promtext
from webhook.telemetry.metrics import EDGE_LABELS, PROMETHEUS_NAMES, REQUESTS
from webhook.telemetry.promtext import Sample

pytestmark = [pytest.mark.root, pytest.mark.envoy, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SERVER, CLIENT = 2, 3  # OTLP span kinds
TD = "spiffe://cluster.local/ns/demo/sa"
TCP_CLOSED = "envoy_sidemesh_tcp_connections_closed_total"
OK, FAILED, CONNECTIONS = 14, 6, 3


@pytest.fixture(scope="module")
def mesh() -> Iterator[Lab]:
    require_root()
    require_tools("ip", "iptables-restore")
    envoy_binary()
    with checked_lab("smtel") as lab:
        m = start(lab)
        client = m.pod("client").ns
        ok = app(client, "hits", WEB, "80", "/", str(OK))
        failed = app(client, "hits", WEB, "80", "/fail", str(FAILED))
        assert ok == {"codes": {"200": OK}, "errors": []}, ok
        assert failed == {"codes": {"500": FAILED}, "errors": []}, failed
        for _ in range(CONNECTIONS):
            assert app(client, "banner", DB, "3306")["ok"]
        yield m


def _eventually(check: Callable[[], Any], what: str, timeout: float = 15) -> Any:
    """Histograms reach /stats/prometheus at Envoy's stats flush (every 5 s)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.25)


def _total(samples: list[Sample]) -> float:
    return sum(s.value for s in samples)


WEB_PEER = {
    "source_workload": "client",
    "source_namespace": "demo",
    "source_principal": f"{TD}/client",
    "destination_workload": "web",
    "destination_namespace": "demo",
    "destination_principal": f"{TD}/web",
    "destination_service": "web.demo.svc.cluster.local",
    "connection_security_policy": "mutual_tls",
}


def _requests(lab: Lab, workload: str, reporter: str) -> list[Sample]:
    """The requests ``workload``'s sidecar counted as ``reporter``, once all of the fixture's
    have reached its histogram (every 5 s)."""

    def flushed() -> list[Sample]:
        got = promtext.select(lab.scrape(workload), REQUESTS, reporter=reporter)
        return got if _total(got) >= OK + FAILED else []

    return list(_eventually(flushed, f"{OK + FAILED} requests at {workload} ({reporter})"))


def test_server_sidecar_counts_each_request_by_caller_and_code(mesh: Lab) -> None:
    mine = _requests(mesh, "web", "destination")
    for s in mine:
        print(dict(s.labels), s.value)
    by_code = {s.labels["response_code"]: s.value for s in mine}
    assert by_code == {"200": OK, "500": FAILED}
    for s in mine:
        assert {k: s.labels[k] for k in WEB_PEER} == WEB_PEER


def test_client_sidecar_reports_the_same_calls_as_their_source(mesh: Lab) -> None:
    http = _requests(mesh, "client", "source")
    for s in http:
        print(s.name, dict(s.labels), s.value)
    # The outbound side runs an HTTP connection manager on a Service's HTTP port: per request.
    by_code = {s.labels["response_code"]: s.value for s in http}
    assert by_code == {"200": OK, "500": FAILED}
    for s in http:
        assert {k: s.labels[k] for k in WEB_PEER} == WEB_PEER


def test_byte_counters_name_the_edge_both_sidecars_saw(mesh: Lab) -> None:
    edge = {k: v for k, v in WEB_PEER.items() if k in EDGE_LABELS}
    for workload, reporter in (("web", "destination"), ("client", "source")):
        samples = mesh.scrape(workload)
        (sent,) = promtext.select(samples, PROMETHEUS_NAMES["response_bytes_total"],
                                  reporter=reporter, **edge)  # fmt: skip
        print(workload, dict(sent.labels), sent.value)
        # One edge, one series: neither the answer's code nor the transport splits the byte
        # counts. The agent adds the reporting sidecar's own principal too (one value).
        assert set(sent.labels) == {*EDGE_LABELS, f"{reporter}_principal"}
        assert sent.labels[f"{reporter}_principal"] == WEB_PEER[f"{reporter}_principal"]
        assert sent.value > 0


def test_tcp_service_shows_connections_and_bytes(mesh: Lab) -> None:
    greeting = len(b"220 db-0 ready\r\n")

    def db_counted() -> list[Sample]:
        got = promtext.select(mesh.scrape("db"), TCP_CLOSED, reporter="destination")
        return got if _total(got) == CONNECTIONS else []

    (closed,) = _eventually(db_counted, "every closed connection at db")
    print(dict(closed.labels))
    # Verified by the certificate; the workload claim is not read on a server-first port.
    assert closed.labels["source_principal"] == f"{TD}/client"
    assert closed.labels["source_namespace"] == "demo"
    assert closed.labels["connection_security_policy"] == "mutual_tls"
    assert closed.labels["source_workload"] == "unknown"
    sent = promtext.select(mesh.scrape("db"), "envoy_sidemesh_tcp_sent_bytes_total",
                           reporter="destination")  # fmt: skip
    assert _total(sent) == CONNECTIONS * greeting
    out = promtext.select(mesh.scrape("client"), TCP_CLOSED, reporter="source",
                          destination_service="db.demo.svc.cluster.local")  # fmt: skip
    assert _total(out) == CONNECTIONS and out[0].labels["destination_workload"] == "db"


def test_access_log_lines_carry_both_identities(mesh: Lab) -> None:
    proxy = mesh.runner("web").procs["sidemesh-proxy"]
    lines: list[dict[str, Any]] = []

    def all_logged() -> bool:  # Envoy flushes its log buffer every 10 s
        lines[:] = [json.loads(x) for x in proxy.output().splitlines() if x.startswith("{")]
        return bool(sum(x.get("path") == "/fail" for x in lines) == FAILED)

    _eventually(all_logged, "every failed request in web's access log", timeout=20)
    served = [x for x in lines if x.get("reporter") == "destination" and x.get("path") == "/fail"]
    assert len(served) == FAILED
    line = served[0]
    print(line)
    assert line["source_principal"] == f"{TD}/client"
    assert line["destination_principal"] == f"{TD}/web"
    assert line["response_code"] == 500
    assert line["filter_chain"] == "inbound-mtls-http"


def test_both_sidecars_export_spans_of_one_trace(mesh: Lab) -> None:
    client = mesh.pod("client").ns
    # The app forwards a sampled W3C trace context it was given; the sidecars join it.
    header = f"traceparent: 00-{TRACE_ID}-00f067aa0ba902b7-01"
    assert app(client, "hits", WEB, "80", "/traced", "1", header)["codes"] == {"200": 1}
    _eventually(lambda: len(mesh.traces().get(TRACE_ID, [])) >= 2, "two spans")
    spans = mesh.traces()[TRACE_ID]
    for span in spans:
        print(span)
    by_service = {s["service"]: s for s in spans}
    assert set(by_service) == {"client.demo", "web.demo"}
    out, into = by_service["client.demo"], by_service["web.demo"]
    assert out["parent_span_id"] == "00f067aa0ba902b7"  # the app's span
    assert into["parent_span_id"] == out["span_id"]  # the server side joined the client's
    assert (out["kind"], into["kind"]) == (CLIENT, SERVER)
    # Without a header the client's sidecar starts a trace (sampling 100 % here) that the
    # server's sidecar joins: the other traces the collector got have both services too.
    started = [
        t
        for t in mesh.traces().values()
        if not any(s["parent_span_id"] == "00f067aa0ba902b7" for s in t)
    ]
    assert started and all(
        {s["service"] for s in t} == {"client.demo", "web.demo"} for t in started
    )


def test_sidemesh_top_shows_success_rate_and_latency_of_web(mesh: Lab) -> None:
    served = _requests(mesh, "web", "destination")
    total = _total(served)
    failed = _total([s for s in served if s.labels["response_code"] == "500"])
    assert failed == FAILED and total >= OK + FAILED
    # From the control plane's list of connected sidecars, as an operator would run it.
    argv = [*SIDEMESH, "top", "--discovery", "http://127.0.0.1:15014", "--window", "0"]
    table = mesh.cp.ns.run(argv, timeout=30).stdout
    print(table)
    as_json = json.loads(mesh.cp.ns.run([*argv, "--json"], timeout=30).stdout)
    (web,) = [r for r in as_json if r["workload"] == "web"]
    assert web["namespace"] == "demo" and web["requests"] == total
    assert web["success"] == pytest.approx((total - failed) / total)
    assert 0 < web["p50"] <= web["p95"] <= web["p99"]
    line = next(x for x in table.splitlines() if " web " in f" {x} ")
    assert f"{100 * (total - failed) / total:.2f}%" in line


def test_dashboard_queries_name_metrics_the_sidecars_export(mesh: Lab) -> None:
    exported = {s.name for w in ("client", "web", "db") for s in mesh.scrape(w)}
    dashboard = (REPO / "manifests" / "dashboards" / "sidemesh.json").read_text()
    named = set(re.findall(r"envoy_sidemesh_[a-z_]+", dashboard))
    print(sorted(named))
    assert len(named) >= 5 and named <= exported, named - exported


def test_namespace_logs_failures_only_where_no_pod_says_otherwise(mesh: Lab) -> None:
    # demo's annotation says "errors"; the client has no annotation of its own (web's says
    # every request, checked above).
    proxy = mesh.runner("client").procs["sidemesh-proxy"]
    lines: list[dict[str, Any]] = []

    def failures_logged() -> bool:
        lines[:] = [json.loads(x) for x in proxy.output().splitlines() if x.startswith("{")]
        return bool(sum(x.get("path") == "/fail" for x in lines) == FAILED)

    _eventually(failures_logged, "every failed request in the client's access log", timeout=20)
    sent = [x for x in lines if x.get("reporter") == "source"]
    assert {x["response_code"] for x in sent} == {500}, sent
    assert len(sent) == FAILED


def test_sidecars_log_no_deprecation_warning(mesh: Lab) -> None:
    # Envoy warns for every listener update that uses a deprecated field (the stats logger's
    # stat_prefix did); the proxy's log is where users read their access logs.
    for name, runner in mesh.runners.items():
        log = runner.procs["sidemesh-proxy"].output()
        assert "Deprecated field" not in log, f"{name}: {log[-2000:]}"


def test_a_call_to_a_pod_ip_names_the_destination_workload(mesh: Lab) -> None:
    # Last: its connections would change the counts the tests above check.
    client = mesh.pod("client").ns
    web_ip = mesh.pod("web").ip
    assert app(client, "hits", web_ip, "8080", "/", "2")["codes"] == {"200": 2}

    def by_pod_ip() -> list[Sample]:
        return promtext.select(
            mesh.scrape("client"), TCP_CLOSED, reporter="source", destination_service="unknown"
        )

    samples = _eventually(by_pod_ip, "the client's count of its connection to web's pod IP")
    assert {
        (s.labels["destination_workload"], s.labels["destination_namespace"]) for s in samples
    } == {("web", "demo")}, samples
    assert samples[0].labels["destination_principal"] == f"{TD}/web"
