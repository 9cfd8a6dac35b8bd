"""The control plane's pure side: manifests → model → per-proxy Envoy resources.

Golden files (``tests/testdata/discovery/``, rewritten by ``make golden``) hold what each pod
of the embedded demo mesh gets, and the real Envoy accepts every one of them.
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TESTDATA, UPDATE_GOLDEN, envoy_binary
from tests.support.xds import make_ca, workload_cert
from webhook.dataplane.ads_bootstrap import XdsOptions, render_ads_bootstrap
from webhook.dataplane.bootstrap import BootstrapOptions, render_sds
from webhook.discovery.build import build_model
from webhook.discovery.clusters import build_endpoints
from webhook.discovery.compiler import proxy_options, proxy_resources
from webhook.discovery.filesource import FileSource, parse_documents
from webhook.discovery.model import Endpoint, MeshModel
from webhook.discovery.objects import protocol_of
from webhook.discovery.resources import encode
from webhook.discovery.store import KINDS, ObjectStore
from webhook.errors import ConfigError

GOLDEN = TESTDATA / "discovery"
PODS = ("frontend-1", "db-0")


def _demo() -> MeshModel:
    store = ObjectStore()
    FileSource(store, None).load()
    return build_model({k: store.list(k) for k in KINDS})


def _resources(model: MeshModel, pod_name: str, **paths: str) -> dict[str, Any]:
    pod = model.pods[("demo", pod_name)]
    opts = proxy_options(pod, trust_domain="cluster.local", plaintext_ports=(53,), **paths)
    res = proxy_resources(model, opts, pod, model.services.values())
    return {
        "clusters": res.clusters,
        "endpoints": res.endpoints,
        "listeners": res.listeners,
        "routes": res.routes,
    }


def _inline_routes(node: Any, routes: dict[str, Any]) -> Any:
    """A copy of ``node`` where every HCM's RDS reference is the RouteConfiguration itself."""
    if isinstance(node, list):
        return [_inline_routes(item, routes) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: _inline_routes(v, routes) for k, v in node.items()}
    if "rds" in out:
        out["route_config"] = routes[out.pop("rds")["route_config_name"]]
    return out


def _check_golden(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    if UPDATE_GOLDEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.read_text() == text, f"{path.name} differs: run `make golden` and review"


@pytest.mark.golden
@pytest.mark.parametrize("pod", PODS)
def test_golden_resources(pod: str) -> None:
    _check_golden(GOLDEN / f"{pod}.json", _resources(_demo(), pod))


@pytest.mark.golden
def test_golden_ads_bootstrap() -> None:
    opts = BootstrapOptions(pod_name="frontend-1", pod_namespace="demo", service_account="fe")
    boot = render_ads_bootstrap(opts, XdsOptions("sidemesh.sidemesh-system.svc:15012"))
    _check_golden(GOLDEN / "ads-bootstrap.json", boot)


def test_no_stale_goldens() -> None:
    wanted = {f"{p}.json" for p in PODS} | {"ads-bootstrap.json"}
    assert {p.name for p in GOLDEN.glob("*.json")} == wanted


@pytest.mark.envoy
@pytest.mark.parametrize("pod", PODS)
def test_real_envoy_accepts_what_each_pod_gets(pod: str, tmp_path: Path) -> None:
    """The same resources, as a static config (EDS inlined) with paths that exist here."""
    ca = make_ca(tmp_path / "ca")
    certs = workload_cert(ca, "spiffe://cluster.local/ns/demo/sa/x", tmp_path / "certs")
    work = tmp_path / "work"
    (work / "sds").mkdir(parents=True)
    res = _resources(_demo(), pod, cert_dir=str(certs), work_dir=str(work))
    opts = BootstrapOptions("p", "demo", "x", cert_dir=str(certs), work_dir=str(work))
    for name, content in render_sds(opts).items():
        (work / "sds" / name).write_text(json.dumps(content))
    clusters = []
    for cluster in res["clusters"].values():
        c = copy.deepcopy(cluster)
        if c.get("type") == "EDS":
            c["type"] = "STATIC"
            c.pop("eds_cluster_config")
            c["load_assignment"] = res["endpoints"][c["name"]]
        clusters.append(c)
    boot = {
        "node": {"id": "sidecar~p.demo", "cluster": "x.demo"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "clusters": clusters,
            "listeners": _inline_routes(list(res["listeners"].values()), res["routes"]),
        },
    }
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(boot))
    out = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_resource_encodes_deterministically() -> None:
    res = _resources(_demo(), "frontend-1")
    types = {
        "clusters": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "endpoints": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
        "listeners": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "routes": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
    }
    for kind, items in res.items():
        for item in items.values():
            a, b = encode(types[kind], item), encode(types[kind], copy.deepcopy(item))
            assert a.body == b.body and a.version == b.version


def test_meshed_endpoints_get_mtls_with_their_identity_others_plaintext() -> None:
    model = _demo()
    eps = {e.ip: e.mtls_identity for e in model.endpoints[("demo", "backend", "http")]}
    assert eps == {
        "10.244.0.11": "spiffe://cluster.local/ns/demo/sa/backend",
        "10.244.0.12": None,  # no sidemesh.io/status: no sidecar
    }
    cla = _resources(model, "frontend-1")["endpoints"][
        "outbound|8080||backend.demo.svc.cluster.local"
    ]
    meta = [e["metadata"]["filter_metadata"] for e in cla["endpoints"][0]["lb_endpoints"]]
    labels = [m["envoy.transport_socket_match"] for m in meta]
    # One server identity among the endpoints: the mode alone selects the mTLS socket.
    assert labels[0] == {"tlsMode": "mutual_tls", "workload": "backend"}
    assert labels[1]["tlsMode"] == "none"  # plaintext
    cluster = _resources(model, "frontend-1")["clusters"][
        "outbound|8080||backend.demo.svc.cluster.local"
    ]
    (match,) = cluster["transport_socket_matches"]
    assert match["match"] == {"tlsMode": "mutual_tls"}
    sans = match["transport_socket"]["typed_config"]["common_tls_context"][
        "combined_validation_context"
    ]["default_validation_context"]["match_typed_subject_alt_names"]
    assert sans == [
        {"san_type": "URI", "matcher": {"exact": "spiffe://cluster.local/ns/demo/sa/backend"}}
    ]


def test_endpoints_of_two_identities_name_theirs_for_the_socket_match() -> None:
    eps = [
        Endpoint("10.0.0.1", 80, "spiffe://cluster.local/ns/demo/sa/v1", "a", ("web-v1", "demo")),
        Endpoint("10.0.0.2", 80, "spiffe://cluster.local/ns/demo/sa/v2", "b", ("web-v2", "demo")),
    ]
    cla = build_endpoints("c", eps)
    labels = [
        e["metadata"]["filter_metadata"]["envoy.transport_socket_match"]
        for e in cla["endpoints"][0]["lb_endpoints"]
    ]
    assert [x["identity"] for x in labels] == [e.mtls_identity for e in eps]
    assert {x["tlsMode"] for x in labels} == {"mutual_tls"}


def test_declared_tcp_port_skips_sniffing_on_both_sides() -> None:
    model = _demo()
    out = _resources(model, "frontend-1")["listeners"]["outbound"]
    http_inspector = next(
        f for f in out["listener_filters"] if f["name"].endswith("http_inspector")
    )
    rules = http_inspector["filter_disabled"]["or_match"]["rules"]
    assert {"destination_port_range": {"start": 3306, "end": 3307}} in rules
    inbound = _resources(model, "db-0")["listeners"]["inbound"]
    tls_inspector = next(f for f in inbound["listener_filters"] if "tls_inspector" in f["name"])
    assert tls_inspector["filter_disabled"] == {
        "destination_port_range": {"start": 3306, "end": 3307}
    }
    chain = inbound["filter_chains"][0]
    assert chain["name"] == "inbound-declared-tcp-3306"
    assert "transport_socket" in chain  # db-0 is STRICT: mTLS, no plaintext on 3306


def test_permissive_declared_tcp_port_is_plaintext_for_meshed_clients() -> None:
    objs = parse_documents(
        (Path(__file__).parent.parent / "webhook/samples/default-mesh.yaml").read_text(), "demo"
    )
    for o in objs:
        if o["kind"] == "Pod" and o["metadata"]["name"] == "db-0":
            del o["metadata"]["annotations"]["sidemesh.io/inbound-mtls"]
    by_kind: dict[str, list[Any]] = {k: [o for o in objs if o["kind"] == k] for k in KINDS}
    model = build_model(by_kind)
    (ep,) = model.endpoints[("demo", "db", "db")]
    assert ep.mtls_identity is None


@pytest.mark.parametrize(
    ("app_protocol", "name", "expected"),
    [
        (None, "http", "http"),
        (None, "http-web", "http"),
        (None, "grpc", "http"),
        ("kubernetes.io/h2c", "x", "http"),
        (None, "mysql", "tcp"),
        ("mysql", "http", "tcp"),  # appProtocol wins over the name
        (None, "tcp-db", "tcp"),
        (None, "web", "sniff"),
        (None, "", "sniff"),
    ],
)
def test_protocol_from_app_protocol_or_port_name(
    app_protocol: str | None, name: str, expected: str
) -> None:
    assert protocol_of(app_protocol, name) == expected


def test_filesource_errors_name_the_file_and_keep_the_old_objects(tmp_path: Path) -> None:
    store = ObjectStore()
    (tmp_path / "a.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: n}\n"
        "spec: {clusterIP: 10.96.0.9, ports: [{port: 80}]}\n"
    )
    src = FileSource(store, tmp_path)
    src.load()
    assert store.get("Service", "n", "s") is not None
    (tmp_path / "a.yaml").write_text("kind: Service\nmetadata: [oops\n")
    assert src.poll()
    assert store.get("Service", "n", "s") is not None  # a half-saved edit empties nothing
    (tmp_path / "a.yaml").unlink()
    assert src.poll()
    assert store.get("Service", "n", "s") is None
    with pytest.raises(ConfigError, match=r"b\.yaml: Pod 'p' has no metadata.namespace"):
        parse_documents("kind: Pod\nmetadata: {name: p}\n", "b.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        FileSource(store, tmp_path / "missing").load()


def test_h2c_and_http1_announce_different_alpn_on_every_http_path() -> None:
    """The peer's inbound side picks its HTTP codec by ALPN: gRPC (h2c) must say sidemesh-h2."""
    out = _resources(_demo(), "frontend-1")["listeners"]["outbound"]
    chains = {c["name"]: c for c in out["filter_chains"]}
    backend = "outbound|8080||backend.demo.svc.cluster.local"

    def alpn(chain: dict[str, Any]) -> str:
        state = chain["filters"][0]["typed_config"]["on_new_connection"][0]
        return str(state["format_string"]["text_format_source"]["inline_string"])

    assert chains[f"{backend}|h2c"]["filter_chain_match"]["application_protocols"] == ["h2c"]
    assert alpn(chains[f"{backend}|h2c"]) == "sidemesh-h2"
    assert alpn(chains[f"{backend}|http"]) == "sidemesh-http"
    assert alpn(chains[backend]) == "sidemesh-tcp"
    pod_h2 = chains["outbound-mesh-h2"]["filters"][-1]["typed_config"]["cluster"]
    assert pod_h2 == "outbound_mesh_h2"
