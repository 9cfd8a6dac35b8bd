"""Telemetry as the control plane compiles it: which labels each side of a hop fills from
where, access-log sampling, workload names, and the Prometheus text reader `sidemesh top`
uses. The real Envoy accepts all of it: the discovery goldens carry it and are validated."""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import envoy_binary
from tests.support.telemetry_compile import (
    compiled_listeners as _listeners,
    demo_model as _demo,
    stat_tags as _tags,
    telemetry_loggers as _loggers,
)
from tests.support.xds import make_ca, workload_cert
from webhook.config import load_config
from webhook.dataplane.bootstrap import render_sds
from webhook.discovery.compiler import LISTENER, proxy_options, proxy_resources
from webhook.discovery.resources import decode, encode
from webhook.errors import ConfigError
from webhook.telemetry import promtext
from webhook.telemetry.metrics import (
    EDGE_LABELS,
    HTTP_LABELS,
    OWN_LABELS,
    PROMETHEUS_NAMES,
    REQUESTS,
    SCOPES,
    TCP_LABELS,
    finish_scrape,
    own_labels,
    stats_logger,
)
from webhook.telemetry.promtext import Sample
from webhook.telemetry.settings import AccessLogPolicy, ProxyFacts, parse_access_log
from webhook.telemetry.top import quantile, render, rows
from webhook.telemetry.workload import (
    OWN_PRINCIPAL,
    OWN_WORKLOAD,
    workload_name,
)

PEER = "envoy.transport_socket_match"
DURATION_NAME = "envoy_sidemesh_request_duration_milliseconds"


@pytest.mark.parametrize(
    ("name", "labels", "want"),
    [
        ("web-7c9f8d6b5-q4zlm", {"pod-template-hash": "7c9f8d6b5", "app": "x"}, "web"),
        ("db-0", {"statefulset.kubernetes.io/pod-name": "db-0"}, "db"),
        ("frontend-1", {"app.kubernetes.io/name": "frontend", "app": "fe"}, "frontend"),
        ("worker-abc", {"app": "Queue.Worker"}, "queue-worker"),
        ("lonely", {}, "lonely"),
    ],
)
def test_workload_is_the_owner_not_the_pod(name: str, labels: dict[str, str], want: str) -> None:
    assert workload_name(name, labels) == want


def test_access_log_policy_syntax() -> None:
    assert parse_access_log("off") == AccessLogPolicy(False)
    assert parse_access_log("errors") == AccessLogPolicy(True, 0.0)
    assert parse_access_log(" 2.5% ") == AccessLogPolicy(True, 2.5)
    for bad in ("0%", "101%", "sometimes", "5"):
        with pytest.raises(ValueError, match=r"off, errors, or a percentage"):
            parse_access_log(bad)
    with pytest.raises(ConfigError, match=r"telemetry\.access_log"):
        load_config({"telemetry": {"access_log": "lots"}})
    with pytest.raises(ConfigError, match=r"telemetry\.tracing_collector"):
        load_config({"telemetry": {"tracing_collector": "otel"}})


def test_pod_annotation_overrides_the_mesh_default_and_a_bad_one_is_ignored() -> None:
    def policy(annotations: dict[str, str]) -> AccessLogPolicy:
        return ProxyFacts.of(
            workload="w", namespace="n", principal="p", annotations=annotations,
            default_access_log="1%",
        ).access_log  # fmt: skip

    assert policy({}) == AccessLogPolicy(True, 1.0)
    assert policy({"telemetry.sidemesh.io/access-log": "off"}) == AccessLogPolicy(False)
    assert policy({"telemetry.sidemesh.io/access-log": "often"}) == AccessLogPolicy(True, 1.0)


def test_client_side_labels_come_from_itself_the_endpoint_and_the_peer_cert() -> None:
    out = _listeners("frontend-1")["outbound"]
    chains = {c["name"]: c for c in out["filter_chains"]}
    backend = "outbound|8080||backend.demo.svc.cluster.local"
    stats, logged = _loggers(chains[f"{backend}|http"])
    tags = _tags(stats)
    assert stats["typed_config"]["stats_scope"]["prefix"] == SCOPES["source"]  # reporter
    # Its own name is added by the agent at scrape time, not formatted on every request ...
    assert not set(tags) & set(OWN_LABELS["source"])
    # ... the access log (a sample of the requests) names it from Envoy's environment.
    fields = logged["typed_config"]["log_format"]["json_format"]
    assert fields["source_workload"] == OWN_WORKLOAD == "%ENVIRONMENT(SIDEMESH_WORKLOAD)%"
    assert fields["source_principal"] == OWN_PRINCIPAL
    assert tags["destination_service"] == "backend.demo.svc.cluster.local"
    assert tags["destination_workload"] == f"%METADATA(UPSTREAM_HOST:{PEER}:workload)%"
    assert tags["destination_namespace"] == "demo"  # the Service's
    assert tags["connection_security_policy"] == f"%METADATA(UPSTREAM_HOST:{PEER}:tlsMode)%"
    assert tags["destination_principal"] == "%UPSTREAM_PEER_URI_SAN%"
    # ... and it tells the server who calls, in the TLS server name.
    states = chains[f"{backend}|http"]["filters"][0]["typed_config"]["on_new_connection"]
    sni = {
        s["object_key"]: s["format_string"]["text_format_source"]["inline_string"] for s in states
    }
    assert sni["envoy.network.upstream_server_name"] == (
        "%ENVIRONMENT(SIDEMESH_WORKLOAD)%.%ENVIRONMENT(SIDEMESH_NAMESPACE)%"
        ".backend.demo.svc.cluster.local"
    )
    # Scrapes of other pods' :15090 are not app traffic.
    assert _loggers(chains["outbound-plain-15090"]) == []


def test_endpoints_say_which_workload_they_are() -> None:
    model = _demo()
    pod = model.pods[("demo", "frontend-1")]
    opts = proxy_options(pod, trust_domain="cluster.local", plaintext_ports=(53,))
    res = proxy_resources(model, opts, pod, model.services.values())
    cla = res.endpoints["outbound|8080||backend.demo.svc.cluster.local"]
    metas = [e["metadata"]["filter_metadata"][PEER] for e in cla["endpoints"][0]["lb_endpoints"]]
    assert [m["tlsMode"] for m in metas] == ["mutual_tls", "none"]
    assert [m["workload"] for m in metas] == ["backend", "backend"]


def test_server_side_trusts_the_certificate_and_marks_plaintext_callers_unknown() -> None:
    inbound = {c["name"]: c for c in _listeners("frontend-1")["inbound"]["filter_chains"]}
    stats, logged = _loggers(inbound["inbound-mtls-http"])
    mtls = _tags(stats)
    assert stats["typed_config"]["stats_scope"]["prefix"] == SCOPES["destination"]
    assert not set(mtls) & set(OWN_LABELS["destination"])
    assert logged["typed_config"]["log_format"]["json_format"]["destination_workload"] == (
        OWN_WORKLOAD
    )
    assert mtls["source_principal"] == "%DOWNSTREAM_PEER_URI_SAN%"
    assert mtls["source_namespace"] == "%FILTER_STATE(sidemesh.peer.namespace:PLAIN)%"
    claim = inbound["inbound-mtls-http"]["filters"][0]["typed_config"]["on_new_connection"]
    assert [c["object_key"] for c in claim] == [
        "sidemesh.peer.workload",
        "sidemesh.peer.namespace",
        "sidemesh.peer.service",
    ]
    assert mtls["connection_security_policy"] == "mutual_tls"
    plain = _tags(_loggers(inbound["inbound-plain-tcp"])[0])
    assert plain["source_principal"] == plain["source_workload"] == "unknown"
    assert plain["connection_security_policy"] == "none"
    assert set(plain) == set(TCP_LABELS) - {"reporter", *OWN_LABELS["destination"]}


def _inbound_http(**telemetry: Any) -> dict[str, Any]:
    chains = _listeners("frontend-1", **telemetry)["inbound"]["filter_chains"]
    return next(c for c in chains if c["name"] == "inbound-mtls-http")


def test_switches_metrics_off_and_access_logs_by_policy() -> None:
    assert _loggers(_inbound_http(metrics=False, access_log="off")) == []
    json_log = _loggers(_inbound_http(access_log="errors"))[1]
    kinds = [next(iter(f)) for f in json_log["filter"]["or_filter"]["filters"]]
    assert kinds == ["response_flag_filter", "status_code_filter"]  # failures only
    assert "filter" not in _loggers(_inbound_http(access_log="100%"))[1]


def test_http_requests_are_the_histogram_count_and_bytes_are_counted_by_edge() -> None:
    config = _loggers(_inbound_http())[0]["typed_config"]
    # The server's side records into its own scope; the agent makes it reporter="destination".
    assert config["stats_scope"] == {"prefix": SCOPES["destination"]} == {"prefix": "sidemesh_in"}
    (duration,) = config["histograms"]
    assert duration["stat"]["name"] == "request_duration_milliseconds"
    assert PROMETHEUS_NAMES["request_duration_milliseconds"] + "_count" == REQUESTS
    skipped = {"reporter", *OWN_LABELS["destination"]}
    assert [t["name"] for t in duration["stat"]["tags"]] == [
        n for n in HTTP_LABELS if n not in skipped
    ]
    counters = {
        c["stat"]["name"]: [t["name"] for t in c["stat"]["tags"]] for c in config["counters"]
    }
    # No second count of the same requests: every label costs Envoy work on every request.
    edge = ["source_workload", "source_namespace", "destination_service"]
    assert [n for n in EDGE_LABELS if n not in skipped] == edge
    assert counters == {"request_bytes_total": edge, "response_bytes_total": edge}
    # 14 (stat, label) pairs per request: 8 + 3 + 3.
    assert sum(len(x["stat"]["tags"]) for x in [*config["counters"], duration]) == 14


def test_the_agent_finishes_each_sides_metrics_with_reporter_and_its_own_labels() -> None:
    own = own_labels("web", "demo", 'spiffe://td/ns/demo/sa/we"b')
    scraped = (
        "# TYPE envoy_cluster_upstream_rq counter\n"
        'envoy_cluster_upstream_rq{envoy_cluster_name="x"} 1\n'  # not ours: untouched
        "# TYPE envoy_sidemesh_out_request_bytes_total counter\n"
        'envoy_sidemesh_out_request_bytes_total{destination_workload="db"} 7\n'
        "# TYPE envoy_sidemesh_in_request_bytes_total counter\n"
        'envoy_sidemesh_in_request_bytes_total{source_workload="client"} 5\n'
        "# TYPE envoy_sidemesh_in_request_duration_milliseconds histogram\n"
        'envoy_sidemesh_in_request_duration_milliseconds_bucket{source_workload="client",'
        'le="0.5"} 3\n'
        "envoy_sidemesh_in_request_duration_milliseconds_count{} 3\n"
        "envoy_sidemesh_in_request_duration_milliseconds_sum 1.5\n"
        # A control plane that still records reporter and the own labels in Envoy: the labels
        # it lacks are added, none twice.
        "# TYPE envoy_sidemesh_tcp_sent_bytes_total counter\n"
        'envoy_sidemesh_tcp_sent_bytes_total{reporter="source",source_workload="old"} 2\n'
    )
    finished = finish_scrape(scraped, own)
    types = [line.split()[2] for line in finished.splitlines() if line.startswith("# TYPE")]
    # One family per golden metric, both sides' samples in it, where its first side stood.
    assert types == [
        "envoy_cluster_upstream_rq",
        "envoy_sidemesh_request_bytes_total",
        "envoy_sidemesh_request_duration_milliseconds",
        "envoy_sidemesh_tcp_sent_bytes_total",
    ]
    samples = list(promtext.parse(finished))
    assert [(s.name, s.value) for s in samples] == [
        ("envoy_cluster_upstream_rq", 1),
        ("envoy_sidemesh_request_bytes_total", 7),
        ("envoy_sidemesh_request_bytes_total", 5),
        ("envoy_sidemesh_request_duration_milliseconds_bucket", 3),
        ("envoy_sidemesh_request_duration_milliseconds_count", 3),
        ("envoy_sidemesh_request_duration_milliseconds_sum", 1.5),
        ("envoy_sidemesh_tcp_sent_bytes_total", 2),
    ]
    assert samples[0].labels == {"envoy_cluster_name": "x"}
    assert samples[1].labels == {
        "reporter": "source", "source_workload": "web", "source_namespace": "demo",
        "source_principal": 'spiffe://td/ns/demo/sa/we"b', "destination_workload": "db",
    }  # fmt: skip
    inbound = {
        "reporter": "destination", "destination_workload": "web",
        "destination_namespace": "demo", "destination_principal": 'spiffe://td/ns/demo/sa/we"b',
    }  # fmt: skip
    assert samples[2].labels == {**inbound, "source_workload": "client"}
    assert samples[3].labels == {**inbound, "source_workload": "client", "le": "0.5"}
    assert samples[4].labels == samples[5].labels == inbound
    assert samples[6].labels["source_workload"] == "old"
    assert samples[6].labels["source_namespace"] == "demo"


def test_stats_logger_refuses_a_label_without_a_value() -> None:
    with pytest.raises(ValueError, match=r"without a value: .*destination_service"):
        stats_logger("http", {k: "x" for k in HTTP_LABELS if k != "destination_service"})


def test_prometheus_text_with_escapes_and_infinities() -> None:
    text = (
        "# TYPE envoy_x counter\n"
        'envoy_x{a="1",b="q\\"uote\\\\d"} 3\n'
        "plain 4.5\n"
        'envoy_h_bucket{le="+Inf"} 7\n'
    )
    samples = list(promtext.parse(text))
    assert samples[0].labels == {"a": "1", "b": 'q"uote\\d'} and samples[0].value == 3
    assert samples[1].name == "plain" and samples[1].value == 4.5
    (bucket,) = promtext.select(samples, "envoy_h_bucket", le="+Inf")
    assert bucket.value == 7
    assert math.isinf(next(promtext.parse("x +Inf\n")).value)
    with pytest.raises(ValueError, match="line 2"):
        list(promtext.parse("ok 1\nbroken{a=1} 2\n"))


def test_tracing_is_off_by_default_and_on_with_a_collector() -> None:
    model = _demo()
    pod = model.pods[("demo", "frontend-1")]
    opts = proxy_options(pod, trust_domain="cluster.local", plaintext_ports=(53,))
    off = proxy_resources(model, opts, pod, model.services.values())
    assert "sidemesh_otlp" not in off.clusters
    assert all("tracing" not in c["filters"][-1]["typed_config"] for c in _chains(off.listeners))
    cfg = load_config({"telemetry": {"tracing_collector": "otel.obs:4317"}}).telemetry
    on = proxy_resources(model, opts, pod, model.services.values(), cfg)
    collector = on.clusters["sidemesh_otlp"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert collector["endpoint"]["address"]["socket_address"] == {
        "address": "otel.obs",
        "port_value": 4317,
    }
    hcms = [
        c["filters"][-1]["typed_config"]
        for c in _chains(on.listeners)
        if c["filters"][-1]["name"].endswith("http_connection_manager")
    ]
    assert hcms and all(h["tracing"]["random_sampling"] == {"value": 1.0} for h in hcms)
    provider = hcms[0]["tracing"]["provider"]["typed_config"]
    # The sidecar names itself (OTEL_RESOURCE_ATTRIBUTES, set by the agent).
    [detector] = provider["resource_detectors"]
    assert detector["name"].endswith("resource_detectors.environment")
    for listener in on.listeners.values():  # what the control plane sends encodes
        encode(LISTENER, listener)
    assert on.listeners["outbound"]["traffic_direction"] == "OUTBOUND"


def _chains(listeners: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for name in ("inbound", "outbound") for c in listeners[name]["filter_chains"]]


@pytest.mark.envoy
def test_real_envoy_accepts_tracing_and_every_logger(tmp_path: Path) -> None:
    model = _demo()
    pod = model.pods[("demo", "frontend-1")]
    ca = make_ca(tmp_path / "ca")
    certs = workload_cert(ca, "spiffe://cluster.local/ns/demo/sa/x", tmp_path / "certs")
    work = tmp_path / "work"
    (work / "sds").mkdir(parents=True)
    opts = proxy_options(
        pod, trust_domain="cluster.local", plaintext_ports=(53,),
        cert_dir=str(certs), work_dir=str(work),
    )  # fmt: skip
    for name, content in render_sds(opts).items():
        (work / "sds" / name).write_text(json.dumps(content))
    cfg = load_config(
        {"telemetry": {"tracing_collector": "127.0.0.1:4317", "access_log": "errors"}}
    ).telemetry
    res = proxy_resources(model, opts, pod, model.services.values(), cfg)
    clusters = []
    for cluster in res.clusters.values():
        c = copy.deepcopy(cluster)
        if c.get("type") == "EDS":
            c["type"] = "STATIC"
            c.pop("eds_cluster_config")
            c["load_assignment"] = res.endpoints[c["name"]]
        clusters.append(c)
    # The bytes the control plane sends, back in JSON: what Envoy reads from ADS.
    listeners = [decode(LISTENER, encode(LISTENER, x)) for x in res.listeners.values()]
    assert '"stats_scope": {"prefix": "sidemesh_in"}' in json.dumps(listeners)
    for listener in listeners:  # RDS inlined: the route configs the control plane sends
        for chain in listener["filter_chains"]:
            hcm = chain["filters"][-1]["typed_config"]
            if "rds" in hcm:
                hcm["route_config"] = res.routes[hcm.pop("rds")["route_config_name"]]
    boot = {
        "node": {"id": "sidecar~p.demo", "cluster": "x.demo"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"clusters": clusters, "listeners": listeners},
    }
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(boot))
    out = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    # Nothing the control plane sends uses a field Envoy calls deprecated.
    assert "Deprecated field" not in out.stdout + out.stderr, out.stdout + out.stderr


def test_quantiles_like_prometheus_histogram_quantile() -> None:
    buckets = {1.0: 10.0, 5.0: 90.0, 10.0: 100.0, math.inf: 100.0}
    assert quantile(0.5, buckets) == pytest.approx(1 + 4 * (50 - 10) / 80)
    assert quantile(0.99, buckets) == pytest.approx(5 + 5 * (99 - 90) / 10)
    assert quantile(0.5, {1.0: 0.0, math.inf: 0.0}) is None
    assert quantile(0.99, {1.0: 1.0, math.inf: 10.0}) == 1.0  # only "above 1 ms" is known


def test_top_rows_count_what_each_workload_answered_between_two_scrapes() -> None:
    def scrape(ok: float, failed: float, fast: float) -> list[Sample]:
        labels = {"reporter": "destination", "destination_namespace": "demo",
                  "destination_workload": "web"}  # fmt: skip
        return [
            Sample(REQUESTS, {**labels, "response_code": "200"}, ok),
            Sample(REQUESTS, {**labels, "response_code": "503"}, failed),
            Sample(
                REQUESTS,
                {"reporter": "source", "destination_workload": "web", "response_code": "200"},
                1000,
            ),
            Sample(f"{DURATION_NAME}_bucket", {**labels, "le": "1"}, fast),
            Sample(f"{DURATION_NAME}_bucket", {**labels, "le": "+Inf"}, ok + failed),
        ]

    (row,) = rows([scrape(110, 10, 60)], [scrape(20, 0, 10)], seconds=10)
    assert (row.requests, row.rps) == (100, 10)
    assert row.success == pytest.approx(0.9)
    assert row.p50 == 1.0
    text = render([row])
    assert text.splitlines()[1].split()[:4] == ["demo", "web", "90.00%", "10.0"]


def test_dashboard_uses_only_metrics_and_labels_the_compiler_defines() -> None:
    path = Path(__file__).resolve().parent.parent / "manifests" / "dashboards" / "sidemesh.json"
    dashboard = json.loads(path.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    known = set(PROMETHEUS_NAMES.values())
    known |= {
        f"{PROMETHEUS_NAMES['request_duration_milliseconds']}_{s}"
        for s in ("bucket", "sum", "count")
    }
    labels = set(HTTP_LABELS) | {"le"}
    for expr in exprs:
        for name in re.findall(r"envoy_sidemesh_[a-z_]+", expr):
            assert name in known, (name, expr)
        for group in re.findall(r"by \(([^)]*)\)", expr):
            assert {x.strip() for x in group.split(",")} <= labels, expr
        for label in re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)\s*\"", expr):
            assert label in labels, (label, expr)
