"""Traffic rules, pure side: Gateway API routes and TrafficPolicy → routing table → Envoy.

The shop mesh (``tests/testdata/routing/mesh.yaml``) has a canary route with subsets, a gRPC
route and two policies; its compiled routes and clusters are a golden file, and the real
Envoy accepts them. ``broken.yaml`` holds one of each kind of mistake, each reported with its
document and field.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml

from tests.conftest import REPO, TESTDATA, UPDATE_GOLDEN, envoy_binary
from webhook.cli.main import main
from webhook.dataplane.bootstrap import BootstrapOptions
from webhook.discovery.build import build_model
from webhook.discovery.clusters import build_cluster, build_endpoints
from webhook.discovery.filesource import parse_documents
from webhook.discovery.model import MeshModel
from webhook.discovery.slim import slim
from webhook.discovery.store import KINDS
from webhook.routing import envoy as ev
from webhook.routing.api import envoy_duration, parse_duration
from webhook.routing.subsets import subset_endpoints
from webhook.routing.table import RoutingTable, build_table

DATA = TESTDATA / "routing"
REVIEWS = "outbound|9080||reviews.shop.svc.cluster.local"
RATINGS = "outbound|50051||ratings.shop.svc.cluster.local"


def _objects(name: str) -> dict[str, list[dict[str, Any]]]:
    by_kind: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    for obj in parse_documents((DATA / name).read_text(), name):
        by_kind[obj["kind"]].append(obj)
    return by_kind


def _shop() -> tuple[MeshModel, RoutingTable]:
    objects = _objects("mesh.yaml")
    model = build_model(objects)
    return model, build_table(objects, model)


def test_durations_are_the_gateway_api_format() -> None:
    assert parse_duration("250ms") == 0.25
    assert parse_duration("1m30s") == 90.0
    assert envoy_duration(0.25) == "0.250s" and envoy_duration(2.0) == "2s"
    for bad in ("2 seconds", "1.5s", "", "-1s", 5):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_routes_follow_gateway_api_precedence() -> None:
    _, table = _shop()
    order = [e.source.split(" ", 2)[2] for e in table.routes[REVIEWS]]
    assert order == [
        "rules[0].matches[1]",  # Exact /v2
        "rules[3]",  # prefix /legacy (the longest prefix)
        "rules[1]",  # prefix /api/
        "rules[2]",  # prefix /old
        "rules[0].matches[0]",  # prefix / with a header match
        "rules[4]",  # prefix /, nothing else: the catch-all comes last
    ]


def test_weighted_backends_resolve_to_subset_clusters_with_pods_by_label() -> None:
    model, table = _shop()
    catch_all = table.routes[REVIEWS][-1]
    assert [(t.cluster, t.weight) for t in catch_all.targets] == [
        ("outbound|9080|v1|reviews.shop.svc.cluster.local", 90),
        ("outbound|9080|v2|reviews.shop.svc.cluster.local", 10),
    ]
    sub = table.subsets["outbound|9080|v1|reviews.shop.svc.cluster.local"]
    svc = model.services[("shop", "reviews")]
    eps = subset_endpoints(model, svc, sub.port, sub.labels)
    assert [e.ip for e in eps] == ["10.244.1.1", "10.244.1.2"]
    # Scoping follows the routes: a client of reviews needs reviews-v2 too (the canary, mirror).
    assert table.backends[("shop", "reviews")] == {("shop", "reviews"), ("shop", "reviews-v2")}
    assert table.problems == ()


def test_redirect_and_rewrite_follow_the_gateway_api_by_path_element() -> None:
    """The compiled regexes, run with Python's re (Envoy's RE2 agrees on these)."""
    import re

    _, table = _shop()
    routes = {e.source: ev.entry_route(e, None) for e in table.routes[REVIEWS]}
    redirect = routes["HTTPRoute shop/reviews rules[2]"]["redirect"]
    assert redirect["response_code"] == "MOVED_PERMANENTLY"
    rewrite = routes["HTTPRoute shop/reviews rules[3]"]["route"]
    assert rewrite["host_rewrite_literal"] == "reviews.internal"

    def apply(spec: dict[str, Any], path: str) -> str:
        pattern = spec["regex_rewrite"]["pattern"]["regex"]
        repl = spec["regex_rewrite"]["substitution"].replace("\\1", "\\g<1>")
        return re.sub(pattern, repl, path)

    assert [apply(redirect, p) for p in ("/old", "/old/a/b")] == ["/new", "/new/a/b"]
    assert [apply(rewrite, p) for p in ("/legacy", "/legacy/x", "/legacy//y")] == ["/", "/x", "/y"]


def test_a_backend_in_another_namespace_needs_a_reference_grant() -> None:
    objects = _objects("mesh.yaml")
    objects["Service"].append(
        {"kind": "Service", "metadata": {"name": "ledger", "namespace": "bank"},
         "spec": {"clusterIP": "10.96.9.9", "ports": [{"name": "http", "port": 80}]}}
    )  # fmt: skip
    route = objects["HTTPRoute"][0]
    route["spec"]["rules"][0]["backendRefs"] = [{"name": "ledger", "namespace": "bank", "port": 80}]
    model = build_model(objects)
    (problem,) = build_table(objects, model).problems
    assert problem.field == "spec.rules[0].backendRefs[0]" and "ReferenceGrant" in problem.message
    grant: dict[str, Any] = {
        "kind": "ReferenceGrant",
        "metadata": {"name": "shop-to-ledger", "namespace": "bank"},
        "spec": {
            "from": [
                {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "shop"}
            ],
            "to": [{"group": "", "kind": "Service", "name": "ledger"}],
        },
    }
    objects["ReferenceGrant"] = [grant]
    table = build_table(objects, model)
    assert table.problems == ()
    first = next(e for e in table.routes[REVIEWS] if e.source.endswith("rules[0].matches[1]"))
    assert [t.cluster for t in first.targets] == ["outbound|80||ledger.bank.svc.cluster.local"]
    assert ("bank", "ledger") in table.backends[("shop", "reviews")]  # scoping follows
    # A grant for GRPCRoutes, or for another Service, does not cover it.
    grant["spec"]["from"][0]["kind"] = "GRPCRoute"
    assert len(build_table(objects, model).problems) == 1
    grant["spec"]["from"][0]["kind"] = "HTTPRoute"
    grant["spec"]["to"][0]["name"] = "vault"
    assert len(build_table(objects, model).problems) == 1


def test_grpc_method_matches_become_paths() -> None:
    _, table = _shop()
    paths = [ev.entry_route(e, None)["match"] for e in table.routes[RATINGS]]
    assert paths == [{"path": "/shop.Ratings/Get"}, {"safe_regex": {"regex": "/[^/]+/List.*"}}]


def _compiled(model: MeshModel, table: RoutingTable) -> dict[str, Any]:
    opts = BootstrapOptions("web", "shop", "web")
    clusters, endpoints, routes = {}, {}, {}
    for svc in model.services.values():
        policy = table.policy_for(svc)
        for port in svc.ports:
            name = svc.cluster_name(port)
            eps = model.endpoints_of(svc, port)
            clusters[name] = ev.apply_cluster_policy(build_cluster(svc, port, eps, opts), policy)
            endpoints[name] = build_endpoints(name, eps)
            entries = table.routes.get(name)
            routes[name] = (
                [ev.entry_route(e, policy) for e in entries]
                if entries
                else [ev.default_route(name, policy)]
            )
        for sub in table.subsets_of(svc):
            eps = subset_endpoints(model, svc, sub.port, sub.labels)
            cluster = build_cluster(svc, sub.port, eps, opts)
            cluster["name"] = cluster["eds_cluster_config"]["service_name"] = sub.name
            clusters[sub.name] = ev.apply_cluster_policy(cluster, policy)
            endpoints[sub.name] = build_endpoints(sub.name, eps)
    return {"clusters": clusters, "endpoints": endpoints, "routes": routes}


@pytest.mark.golden
def test_golden_compiled_rules() -> None:
    model, table = _shop()
    data = _compiled(model, table)
    data = {"routes": data["routes"], "clusters": {k: v for k, v in data["clusters"].items()}}
    for cluster in data["clusters"].values():
        cluster.pop("transport_socket_matches", None)  # certificates: the discovery goldens
    path = DATA / "compiled.json"
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    if UPDATE_GOLDEN:
        path.write_text(text)
    assert path.read_text() == text, "compiled.json differs: run `make golden` and review"


def test_policy_reaches_clusters_and_routes() -> None:
    model, table = _shop()
    data = _compiled(model, table)
    reviews = data["clusters"][REVIEWS]
    assert reviews["lb_policy"] == "RING_HASH"
    limits = reviews["circuit_breakers"]["thresholds"][0]
    assert (limits["max_connections"], limits["max_pending_requests"]) == (100, 10)
    assert limits["retry_budget"] == {"budget_percent": {"value": 20.0}, "min_retry_concurrency": 3}
    assert reviews["outlier_detection"]["consecutive_5xx"] == 3
    route = data["routes"][REVIEWS][-1]
    assert route["route"]["retry_policy"]["num_retries"] == 3
    assert route["route"]["hash_policy"] == [{"header": {"header_name": "x-user"}}]
    assert route["metadata"]["filter_metadata"][ev.RULE_METADATA] == {
        "rule": "HTTPRoute shop/reviews rules[4]",
        "policy": "TrafficPolicy shop/reviews",
    }
    api = data["routes"][REVIEWS][2]["route"]
    # The route's backendRequest wins over the policy's perTryTimeout.
    assert (api["timeout"], api["retry_policy"]["per_try_timeout"]) == ("2s", "0.500s")
    fault = data["routes"][RATINGS][0]["typed_per_filter_config"]["envoy.filters.http.fault"]
    assert fault["abort"] == {
        "grpc_status": 14,
        "percentage": {"numerator": 50000, "denominator": "MILLION"},
    }


@pytest.mark.envoy
def test_real_envoy_accepts_the_compiled_rules(tmp_path: Path) -> None:
    model, table = _shop()
    data = _compiled(model, table)
    clusters = []
    for name, cluster in data["clusters"].items():
        cluster.pop("transport_socket_matches", None)
        cluster["type"] = "STATIC"
        cluster.pop("eds_cluster_config")
        cluster["load_assignment"] = data["endpoints"][name]
        clusters.append(cluster)
    listeners = []
    for i, (name, routes) in enumerate(sorted(data["routes"].items())):
        hcm = {
            "@type": "type.googleapis.com/envoy.extensions.filters.network."
            "http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": f"r{i}",
            "route_config": {
                "name": name,
                "virtual_hosts": [{"name": name, "domains": ["*"], "routes": routes}],
            },
            "http_filters": [
                ev.FAULT_FILTER,
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http."
                        "router.v3.Router"
                    },
                },
            ],
        }
        listeners.append(
            {
                "name": f"l{i}",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [
                    {
                        "filters": [
                            {
                                "name": "envoy.filters.network.http_connection_manager",
                                "typed_config": hcm,
                            }
                        ]
                    }
                ],
            }
        )
    boot = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"clusters": clusters, "listeners": listeners},
    }
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(boot))
    out = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def _check(*argv: str) -> tuple[int, Any]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["check", *argv, "-o", "json"])
    return code, json.loads(buf.getvalue())


def test_check_names_document_and_field_of_every_mistake() -> None:
    code, docs = _check("-f", str(DATA / "broken.yaml"))
    assert code == 1
    found = {(d["document"], p["field"]) for d in docs for p in d["problems"]}
    assert found == {
        (1, "spec.parentRefs[0].port"),  # the Service has no such port
        (2, "spec.rules[0].matches[0].path.value"),  # a regex that does not compile
        (2, "spec.rules[0].matches"),  # ... so the rule has no usable match
        (2, "spec.rules[1].filters[0].type"),  # CORS: not supported yet
        (2, "spec.rules[2].matches"),  # a prefix redirect under an Exact match
        (2, "spec.rules[1].timeouts.request"),  # "2 seconds"
        (2, "spec.rules[1].backendRefs[1].name"),  # subset v9 defined nowhere
        (3, "spec.retries.attempts"),
        (3, "spec.retries.retryOn"),
        (3, "spec.fault.abort"),
        (3, "spec.loadBalancer.consistentHash"),
        (4, "spec.targetRef.name"),  # Service ghost does not exist
    }


def test_check_explains_what_each_rule_applies_to() -> None:
    code, docs = _check("-f", str(DATA / "mesh.yaml"))
    assert code == 0
    by_name = {(d["kind"], d["name"]): d for d in docs}
    route = by_name[("HTTPRoute", "reviews")]
    assert route["explanation"][0] == "applies to requests for shop/reviews:9080"
    assert "90% shop/reviews:9080 subset v1, 10% shop/reviews:9080 subset v2" in "\n".join(
        route["explanation"]
    )
    policy = by_name[("TrafficPolicy", "ratings")]["explanation"]
    assert "fault: abort with gRPC status 14 on 5% of requests" in policy


def test_check_without_services_says_references_were_not_checked(tmp_path: Path) -> None:
    rules = [d for d in yaml.safe_load_all((DATA / "mesh.yaml").read_text())]
    only = [d for d in rules if d["kind"] in ("HTTPRoute", "TrafficPolicy")]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump_all(only))
    code, docs = _check("-f", str(path))
    assert code == 0  # a warning, not an error
    assert all(d["problems"][0]["severity"] == "warning" for d in docs)
    # ... and with the mesh given by --mesh-dir, they are checked (and fine).
    mesh = tmp_path / "mesh"
    mesh.mkdir()
    (mesh / "mesh.yaml").write_text((DATA / "mesh.yaml").read_text())
    code, docs = _check("-f", str(path), "--mesh-dir", str(mesh))
    assert code == 0 and all(d["problems"] == [] for d in docs)


def test_slim_keeps_the_whole_rule_and_its_age() -> None:
    route = _objects("mesh.yaml")["HTTPRoute"][0]
    full = {**route, "metadata": {**route["metadata"], "managedFields": [{"x": 1}]}}
    kept = slim("HTTPRoute", full)
    assert kept["spec"] == route["spec"]
    assert kept["metadata"]["creationTimestamp"] == "2026-01-01T00:00:00Z"
    assert "managedFields" not in kept["metadata"]


def _crd_schema(path: Path, version: str) -> dict[str, Any]:
    crd = yaml.safe_load(path.read_text())
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema: dict[str, Any] = v["schema"]["openAPIV3Schema"]
    return schema


def test_rules_validate_against_the_shipped_crd_schemas() -> None:
    """The OpenAPI part of the CRDs (OpenAPI 3.0 schemas: draft 4; the CEL rules need an
    API server)."""
    objects = _objects("mesh.yaml")
    schemas = {
        "TrafficPolicy": _crd_schema(REPO / "manifests/trafficpolicy-crd.yaml", "v1alpha1"),
        "HTTPRoute": _crd_schema(
            REPO / "manifests/gateway-api/gateway.networking.k8s.io_httproutes.yaml", "v1"
        ),
        "GRPCRoute": _crd_schema(
            REPO / "manifests/gateway-api/gateway.networking.k8s.io_grpcroutes.yaml", "v1"
        ),
    }
    for kind, schema in schemas.items():
        for obj in objects[kind]:
            jsonschema.Draft4Validator(schema).validate(obj)
    policy = objects["TrafficPolicy"][0]
    bad_specs: list[dict[str, Any]] = [
        {**policy["spec"], "retries": {"attempts": 30}},
        {**policy["spec"], "fault": {"delay": {"percent": 10}}},  # no fixedDelay
        {**policy["spec"], "subsets": [{"name": "V1", "labels": {"a": "b"}}]},
        {"subsets": []},  # no targetRef
    ]
    for bad_spec in bad_specs:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.Draft4Validator(schemas["TrafficPolicy"]).validate(
                {**policy, "spec": bad_spec}
            )
