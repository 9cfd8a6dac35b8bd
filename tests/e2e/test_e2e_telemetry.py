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

import copy
import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import envoy_binary, require_root, require_tools
from tests.support.jwks_issuer import Issuer
from tests.support.meshlab import (
    APP_UID,
    MESHAPP,
    PYTHON,
    SIDEMESH,
    admit,
    app,
    checked_lab,
    https_json,
)
from tests.support.netns import NetnsLab, Pod
from tests.support.podrunner import PodRunner
from webhook.telemetry import promtext
from webhook.telemetry.promtext import Sample

pytestmark = [pytest.mark.root, pytest.mark.envoy, pytest.mark.e2e]

WEB, DB = "10.96.0.10", "10.96.0.13"
OTLP_PORT = 4317
REPO = Path(__file__).resolve().parents[2]
RECEIVER = REPO / "tests" / "support" / "otlp_receiver.py"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SERVER, CLIENT = 2, 3  # OTLP span kinds
TD = "spiffe://cluster.local/ns/demo/sa"
REQUESTS = "envoy_sidemesh_requests_total"
DURATION = "envoy_sidemesh_request_duration_milliseconds_count"
TCP_CLOSED = "envoy_sidemesh_tcp_connections_closed_total"
OK, FAILED, CONNECTIONS = 14, 6, 3

#: pod name → (service account, ports, annotations, pod-template-hash)
PODS = {
    "client-6d4cf56db6-x7k2p": ("client", [8080], {}, "6d4cf56db6"),
    "web-7c9f8d6b5-q4zlm": ("web", [8080], {"telemetry.sidemesh.io/access-log": "100%"},
                            "7c9f8d6b5"),
    # STRICT: a PERMISSIVE pod serves a declared server-first port in plaintext.
    "db-0": ("db", [3306], {"sidemesh.io/inbound-mtls": "STRICT"}, ""),
}  # fmt: skip


def _manifest(name: str) -> dict[str, Any]:
    sa, ports, annotations, template_hash = PODS[name]
    labels = {"app": sa}
    if template_hash:
        labels["pod-template-hash"] = template_hash
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "demo", "labels": labels,
                     "annotations": annotations},
        "spec": {
            "serviceAccountName": sa,
            "securityContext": {"runAsUser": APP_UID, "runAsGroup": APP_UID},
            "containers": [{
                "name": "app",
                "image": "example.com/app:1",
                "ports": [{"containerPort": p, "protocol": "TCP"} for p in ports],
            }],
        },
    }  # fmt: skip


def _service(name: str, ip: str, port: int, target: int, proto: str | None) -> Any:
    spec_port: dict[str, Any] = {"name": "main", "port": port, "targetPort": target}
    if proto:
        spec_port["appProtocol"] = proto
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [spec_port]},
    }


def _slice(service: str, port: int, pod: str, ip: str) -> Any:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": f"{service}-1", "namespace": "demo",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "main", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True},
                       "targetRef": {"kind": "Pod", "namespace": "demo", "name": pod}}],
    }  # fmt: skip


class Lab:
    def __init__(self, lab: NetnsLab) -> None:
        self.lab = lab
        self.node = lab.node()
        self.cp = self.node.add_pod("cp")
        # The client needs a default route: ClusterIPs exist only in its sidecar's config.
        self.pods: dict[str, Pod] = {
            n: self.node.add_pod(n.split("-")[0], default_route=n.startswith("client"))
            for n in PODS
        }
        self.mesh_dir = lab.tmpdir("mesh")
        self.runners: dict[str, PodRunner] = {}
        self.spans = self.mesh_dir / "spans.jsonl"

    def traces(self) -> dict[str, list[dict[str, Any]]]:
        """The spans the test collector received, by trace id."""
        out: dict[str, list[dict[str, Any]]] = {}
        text = self.spans.read_text() if self.spans.exists() else ""
        for line in text.splitlines():
            span = json.loads(line)
            out.setdefault(span["trace_id"], []).append(span)
        return out

    def pod(self, workload: str) -> Pod:
        return next(p for n, p in self.pods.items() if n.startswith(workload))

    def runner(self, workload: str) -> PodRunner:
        return next(r for n, r in self.runners.items() if n.startswith(workload))

    def write(self, name: str, obj: Any) -> None:
        tmp = self.mesh_dir / f".{name}.tmp"
        tmp.write_text(json.dumps(obj))
        tmp.rename(self.mesh_dir / f"{name}.json")

    def scrape(self, workload: str) -> list[Sample]:
        """The pod's metrics, from the node, as Prometheus scrapes them."""
        url = f"http://{self.pod(workload).ip}:15090/stats/prometheus"

        def call() -> str:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return str(resp.read().decode())

        return list(promtext.parse(self.node.ns.in_namespace(call)))


def _start(lab: NetnsLab) -> Lab:
    m = Lab(lab)
    pki = lab.tmpdir("pki")
    subprocess.run([*SIDEMESH, "ca", "init", "--dir", str(pki)], check=True, capture_output=True)
    subprocess.run(
        [*SIDEMESH, "ca", "serving-cert", "--dir", str(pki), "--ip", m.cp.ip], check=True,
        capture_output=True,
    )  # fmt: skip
    issuer = Issuer.create()
    jwks = issuer.write_jwks(lab.tmpdir("jwks") / "jwks.json")
    config = lab.tmpdir("config") / "mesh.yaml"
    config.write_text(json.dumps({
        "ca_address": f"https://{m.cp.ip}:8443",
        "discovery_address": f"{m.cp.ip}:15012",
        "mesh_cidrs": [str(m.node.subnet)],
        "telemetry": {"tracing_collector": f"{m.cp.ip}:{OTLP_PORT}", "tracing_sampling": 100},
    }))  # fmt: skip
    m.spans = lab.tmpdir("otlp") / "spans.jsonl"
    m.cp.ns.spawn([sys.executable, str(RECEIVER), str(OTLP_PORT), str(m.spans)]).expect("listening")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SIDEMESH_JWKS_FILE": str(jwks),
           "SIDEMESH_JWKS_ISSUER": issuer.issuer_url}  # fmt: skip
    m.cp.ns.spawn(
        [*SIDEMESH, "serve", "--host", "0.0.0.0", "--port", "8443", "--cert-dir", str(pki),
         "--config", str(config), "--log-level", "warning"], env=env,
    )  # fmt: skip
    cp_url = f"https://{m.cp.ip}:8443"
    deadline = time.monotonic() + 30
    while https_json(m.node.ns, f"{cp_url}/readyz", pki / "ca.crt")[0] != 200:
        assert time.monotonic() < deadline, "sidemesh serve never became ready"
        time.sleep(0.1)
    admitted = {}
    for name in PODS:
        pod = admit(m.node.ns, cp_url, pki / "ca.crt", _manifest(name))
        admitted[name] = pod
        record = copy.deepcopy(pod)
        ip = m.pods[name].ip
        record["status"] = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
        m.write(f"pod-{name}", record)
    m.write("ns", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}})
    for svc, ip, port, target, proto in (("web", WEB, 80, 8080, None),
                                         ("db", DB, 3306, 3306, "mysql")):  # fmt: skip
        pod_name = next(n for n in PODS if n.startswith(svc))
        m.write(f"svc-{svc}", _service(svc, ip, port, target, proto))
        m.write(f"slice-{svc}", _slice(svc, target, pod_name, m.pods[pod_name].ip))
    m.cp.ns.spawn(
        [*SIDEMESH, "discovery", "--listen", "0.0.0.0:15012", "--cert-dir", str(pki),
         "--mesh-dir", str(m.mesh_dir), "--poll-interval", "0.2", "--config", str(config),
         "--log-level", "warning"],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )  # fmt: skip
    m.cp.ns.wait_port(15014)
    for name, (_sa, ports, _ann, _hash) in PODS.items():
        command = "serve-banner" if name.startswith("db") else "serve"
        runner = PodRunner(
            lab=lab, node=m.node, pod_net=m.pods[name], pod=admitted[name],
            app_commands={"app": [PYTHON, MESHAPP, command, *map(str, ports)]},
            sidemesh=SIDEMESH, token_for=issuer.token,
        )  # fmt: skip
        runner.start()
        runner.procs["app"].expect("listening")
        m.runners[name] = runner
    return m


@pytest.fixture(scope="module")
def mesh() -> Iterator[Lab]:
    require_root()
    require_tools("ip", "iptables-restore")
    envoy_binary()
    with checked_lab("smtel") as lab:
        m = _start(lab)
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


def test_server_sidecar_counts_each_request_by_caller_and_code(mesh: Lab) -> None:
    samples = mesh.scrape("web")
    mine = promtext.select(samples, REQUESTS, reporter="destination")
    for s in mine:
        print(dict(s.labels), s.value)
    by_code = {s.labels["response_code"]: s.value for s in mine}
    assert by_code == {"200": OK, "500": FAILED}
    for s in mine:
        assert {k: s.labels[k] for k in WEB_PEER} == WEB_PEER
    durations = _eventually(
        lambda: (
            _total(promtext.select(mesh.scrape("web"), DURATION, reporter="destination"))
            == OK + FAILED
        ),
        "the duration histogram",
    )
    assert durations


def test_client_sidecar_reports_the_same_calls_as_their_source(mesh: Lab) -> None:
    samples = mesh.scrape("client")
    http = promtext.select(samples, REQUESTS, reporter="source")
    for s in http:
        print(s.name, dict(s.labels), s.value)
    # The outbound side runs an HTTP connection manager on a Service's HTTP port: per request.
    by_code = {s.labels["response_code"]: s.value for s in http}
    assert by_code == {"200": OK, "500": FAILED}
    for s in http:
        assert {k: s.labels[k] for k in WEB_PEER} == WEB_PEER


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
    served = promtext.select(mesh.scrape("web"), REQUESTS, reporter="destination")
    total = _total(served)
    failed = _total([s for s in served if s.labels["response_code"] == "500"])
    assert failed == FAILED and total >= OK + FAILED

    def histogram_flushed() -> bool:
        counts = promtext.select(mesh.scrape("web"), DURATION, reporter="destination")
        return _total(counts) == total

    _eventually(histogram_flushed, "every request in web's duration histogram")
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
