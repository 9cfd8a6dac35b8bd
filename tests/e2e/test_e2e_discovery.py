"""The control plane end to end: real Envoys programmed over ADS, in network namespaces, with
no kube-proxy — a ClusterIP exists nowhere, so it only works through the client's sidecar.

    node 10.200.0.1 ── cp       sidemesh serve (webhook + CA) and sidemesh discovery (:15012)
                     ├─ client  meshed, PERMISSIVE
                     ├─ web-1/2 meshed, PERMISSIVE   web-3 meshed, STRICT
                     ├─ db      meshed, PERMISSIVE, a server-first protocol on 3306 (mysql)
                     ├─ echo-1/2 meshed, PERMISSIVE, gRPC on 50051, namespace tools
                     └─ legacy  no sidecar: HTTP on 8080, server-first on 3306

Services (manifests in a directory the control plane watches): ``web`` (web-1..3), ``mixed``
(web-1 + legacy: a half-meshed Deployment), ``legacy`` (legacy only), ``db`` and ``legacydb``
(``appProtocol: mysql``), ``echo`` in namespace ``tools`` (echo-1/2, ``appProtocol: grpc``).
The control plane scopes each sidecar (``--scoped``): the client (namespace demo) learns echo
when it first calls it.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import envoy_binary, require_root, require_tools
from tests.support.meshlab import (
    APP_UID,
    MESHAPP,
    PYTHON,
    SIDEMESH,
    admit,
    app,
    checked_lab,
    debug_json,
    start_control_plane,
    start_discovery,
    stats,
    write_manifest,
)
from tests.support.netns import NetnsLab, Pod
from tests.support.podrunner import PodRunner
from tests.support.programs import PROGRAMS

pytestmark = [pytest.mark.root, pytest.mark.envoy, pytest.mark.e2e]

WEB, MIXED, LEGACY, DB, LEGACYDB, ECHO = (
    "10.96.0.10",
    "10.96.0.11",
    "10.96.0.12",
    "10.96.0.13",
    "10.96.0.14",
    "10.96.0.15",
)
PROTOAPP = str(PROGRAMS / "protoapp.py")
#: grpcio lives in the venv; the app uid can run its interpreter.
VENV_PYTHON = sys.executable
CLIENT_ID = "spiffe://cluster.local/ns/demo/sa/client"


def _ns(name: str) -> str:
    """echo-1/2 and their Service live in ``tools``: outside the client's scope."""
    return "tools" if name.startswith("echo") else "demo"


def _manifest(name: str, sa: str, ports: list[int], annotations: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": _ns(name),
            "labels": {"app": name.split("-")[0]},
            "annotations": annotations,
        },
        "spec": {
            "serviceAccountName": sa,
            "securityContext": {"runAsUser": APP_UID, "runAsGroup": APP_UID},
            "containers": [
                {
                    "name": "app",
                    "image": "example.com/app:1",
                    "ports": [{"containerPort": p, "protocol": "TCP"} for p in ports],
                    "env": [
                        {
                            "name": "POD_NAME",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                        }
                    ],
                }
            ],
        },
    }


def _service(name: str, ip: str, port: int, target: int, app_protocol: str | None = None) -> Any:
    spec_port: dict[str, Any] = {
        "name": "main",
        "port": port,
        "targetPort": target,
        "protocol": "TCP",
    }
    if app_protocol:
        spec_port["appProtocol"] = app_protocol
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": _ns(name)},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [spec_port]},
    }


def _slice(service: str, port: int, pods: list[tuple[str, str]]) -> Any:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service}-1",
            "namespace": _ns(service),
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": "main", "port": port, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [ip],
                "conditions": {"ready": True},
                "targetRef": {"kind": "Pod", "namespace": _ns(name), "name": name},
            }
            for name, ip in pods
        ],
    }


def _caller(xfcc: str | None) -> str | None:
    """The caller's SPIFFE id in an ``x-forwarded-client-cert`` value (None: no header)."""
    if xfcc is None:
        return None
    fields = dict(part.split("=", 1) for part in xfcc.split(";") if "=" in part)
    return fields.get("URI")


class Lab:
    def __init__(self, lab: NetnsLab) -> None:
        self.lab = lab
        self.node = lab.node()
        self.cp = self.node.add_pod("cp")
        self.pods: dict[str, Pod] = {}
        for name in ("web-1", "web-2", "web-3", "db", "echo-1", "echo-2"):
            self.pods[name] = self.node.add_pod(name)
        for name in ("client", "legacy"):
            self.pods[name] = self.node.add_pod(name, default_route=True)
        self.mesh_dir = lab.tmpdir("mesh")
        self.runners: dict[str, PodRunner] = {}

    def ip(self, name: str) -> str:
        return self.pods[name].ip

    def write(self, name: str, obj: Any) -> None:
        write_manifest(self.mesh_dir, name, obj)

    def debug(self, path: str) -> Any:
        return debug_json(self.cp, path)


def _start(lab: NetnsLab) -> Lab:
    m = Lab(lab)
    plane = start_control_plane(lab, m.node, m.cp, discovery_address=f"{m.cp.ip}:15012")
    pki, issuer, cp_url = plane.pki, plane.issuer, plane.url

    specs = {
        "client": ("client", [8080], {}),
        "web-1": ("web", [8080], {}),
        "web-2": ("web", [8080], {}),
        "web-3": ("web", [8080], {"sidemesh.io/inbound-mtls": "STRICT"}),
        "db": ("db", [3306], {}),
        "echo-1": ("echo", [8080, 50051], {}),
        "echo-2": ("echo", [8080, 50051], {}),
    }
    admitted: dict[str, dict[str, Any]] = {}
    for name, (sa, ports, ann) in specs.items():
        pod = admit(m.node.ns, cp_url, pki / "ca.crt", _manifest(name, sa, ports, ann))
        admitted[name] = pod
        record = copy.deepcopy(pod)
        record["status"] = {"phase": "Running", "podIP": m.ip(name), "podIPs": [{"ip": m.ip(name)}]}
        m.write(f"pod-{name}", record)
    legacy = _manifest("legacy", "legacy", [8080, 3306], {})
    legacy["status"] = {"phase": "Running", "podIP": m.ip("legacy")}
    m.write("pod-legacy", legacy)
    for ns in ("demo", "tools"):
        m.write(f"ns-{ns}", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    webs = [(n, m.ip(n)) for n in ("web-1", "web-2", "web-3")]
    for name, ip, port, target, proto, backends in (
        ("web", WEB, 80, 8080, None, webs),
        ("mixed", MIXED, 80, 8080, None, [webs[0], ("legacy", m.ip("legacy"))]),
        ("legacy", LEGACY, 80, 8080, None, [("legacy", m.ip("legacy"))]),
        ("db", DB, 3306, 3306, "mysql", [("db", m.ip("db"))]),
        ("legacydb", LEGACYDB, 3306, 3306, "mysql", [("legacy", m.ip("legacy"))]),
        ("echo", ECHO, 50051, 50051, "grpc", [(n, m.ip(n)) for n in ("echo-1", "echo-2")]),
    ):
        m.write(f"svc-{name}", _service(name, ip, port, target, proto))
        m.write(f"slice-{name}", _slice(name, target, backends))

    start_discovery(m.cp, pki, m.mesh_dir, "--scoped")

    m.pods["legacy"].ns.spawn(
        [PYTHON, MESHAPP, "serve", "8080"], uid=APP_UID, gid=APP_UID, env={"POD_NAME": "legacy"}
    ).expect("listening")
    m.pods["legacy"].ns.spawn(
        [PYTHON, MESHAPP, "serve-banner", "3306"], uid=APP_UID, gid=APP_UID,
        env={"POD_NAME": "legacy"},
    ).expect("listening")  # fmt: skip
    for name in ("web-1", "web-2", "web-3", "db", "echo-1", "echo-2", "client"):
        port_args = [str(p) for p in specs[name][1]]
        command = [PYTHON, MESHAPP, "serve-banner" if name == "db" else "serve", *port_args]
        if name.startswith("echo-"):
            command = [VENV_PYTHON, PROTOAPP, "serve", "8080"]
        runner = PodRunner(
            lab=lab,
            node=m.node,
            pod_net=m.pods[name],
            pod=admitted[name],
            app_commands={"app": command},
            sidemesh=SIDEMESH,
            token_for=issuer.token,
        )
        runner.start()
        runner.procs["app"].expect("listening")
        m.runners[name] = runner
    return m


@pytest.fixture(scope="module")
def mesh() -> Iterator[Lab]:
    require_root()
    require_tools("ip", "iptables-restore")
    envoy_binary()
    with checked_lab("smdisc") as lab:
        yield _start(lab)


def test_cluster_ip_is_balanced_across_three_meshed_replicas_over_mtls(mesh: Lab) -> None:
    result = app(mesh.pods["client"].ns, "count", WEB, "80", "300")
    print("per replica:", result["pods"])
    assert result["failures"] == []
    assert set(result["pods"]) == {"web-1", "web-2", "web-3"}
    for count in result["pods"].values():
        assert 85 <= count <= 115  # 100 ± 15 %
    # Every replica saw the client's verified identity: mTLS on every hop (STRICT web-3 too).
    assert {_caller(seen[0]) for seen in result["seen"].values()} == {CLIENT_ID}


def test_one_keepalive_connection_is_balanced_request_by_request(mesh: Lab) -> None:
    """The client's sidecar routes each request, not each connection: one HTTP/1.1 keep-alive
    connection from the app reaches every replica."""
    result = app(mesh.pods["client"].ns, "keepalive", WEB, "80", "90")
    print("one connection, per replica:", result["pods"])
    assert result["failures"] == [] and result["connections"] == 1
    assert set(result["pods"]) == {"web-1", "web-2", "web-3"}
    assert all(count == 30 for count in result["pods"].values())  # round robin


def test_scoped_client_learns_a_service_it_never_declared_on_first_use(mesh: Lab) -> None:
    """The client (scoped: namespace demo) calls echo.tools, which it never declared: the first
    connection asks the control plane for the cluster on demand and is served; from then on the
    client's sidecar has echo's own cluster, endpoints and routes."""
    echo = "outbound|50051||echo.tools.svc.cluster.local"

    def client_clusters() -> set[str]:
        return {c["name"] for c in mesh.debug("/debug/config?pod=demo/client")["clusters"]}

    assert echo not in client_clusters()
    done = mesh.pods["client"].ns.run(
        [VENV_PYTHON, PROTOAPP, "grpc", ECHO, "50051", "2"], uid=APP_UID, gid=APP_UID, timeout=30
    )
    first = json.loads(done.stdout.strip().splitlines()[-1])
    assert first["ok"], first
    deadline = time.monotonic() + 10
    while not {echo, f"learn|{ECHO}:50051"} <= client_clusters():
        assert time.monotonic() < deadline, client_clusters()
        time.sleep(0.05)
    wait_synced(mesh, "demo/client")


def wait_synced(mesh: Lab, pod: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        (proxy,) = [p for p in mesh.debug("/debug/proxies")["proxies"] if p["pod"] == pod]
        if proxy["synced"]:
            return
        assert time.monotonic() < deadline, proxy
        time.sleep(0.05)


def test_grpc_through_a_service_is_balanced_per_call_with_verified_identity(mesh: Lab) -> None:
    """gRPC keeps one HTTP/2 connection; without a mesh every call lands on one replica.
    (Runs after the client learned echo: its sidecar has echo's routes.)"""
    client = mesh.pods["client"].ns
    done = client.run(
        [VENV_PYTHON, PROTOAPP, "grpc-spread", ECHO, "50051", "40"],
        uid=APP_UID,
        gid=APP_UID,
        timeout=30,
    )
    spread = json.loads(done.stdout.strip().splitlines()[-1])
    print("gRPC calls per replica:", spread)
    assert spread["failures"] == []
    assert spread["pods"] == {"echo-1": 20, "echo-2": 20}
    forged = "URI=spiffe://cluster.local/ns/demo/sa/admin"
    done = client.run(
        [VENV_PYTHON, PROTOAPP, "grpc", ECHO, "50051", "3", forged],
        uid=APP_UID,
        gid=APP_UID,
        timeout=30,
    )
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["ok"], answer
    assert len(answer["stream"]) == 3
    # The server saw the verified caller, not the header the client forged.
    assert _caller(answer["unary"]["xfcc"]) == CLIENT_ID


def test_meshed_client_reaches_non_meshed_pod_and_service_in_plaintext(mesh: Lab) -> None:
    client = mesh.pods["client"].ns
    via_service = app(client, "count", LEGACY, "80", "10")
    assert via_service["failures"] == [] and via_service["pods"] == {"legacy": 10}
    assert via_service["seen"]["legacy"][0] is None  # no sidecar: no identity header
    direct = app(client, "get", mesh.ip("legacy"), "8080", "/")
    assert direct["ok"] and direct["xfcc"] is None
    # ... while a meshed peer, by pod IP, still gets mTLS.
    meshed = app(client, "get", mesh.ip("web-1"), "8080", "/")
    assert meshed["ok"] and _caller(meshed["xfcc"]) == CLIENT_ID


def test_half_meshed_deployment_serves_every_request(mesh: Lab) -> None:
    result = app(mesh.pods["client"].ns, "count", MIXED, "80", "40")
    assert result["failures"] == []
    assert set(result["pods"]) == {"web-1", "legacy"}
    assert _caller(result["seen"]["web-1"][0]) == CLIENT_ID
    assert result["seen"]["legacy"][0] is None


def test_server_first_protocol_on_a_declared_port_waits_for_no_sniffing(mesh: Lab) -> None:
    client, legacy = mesh.pods["client"].ns, mesh.pods["legacy"].ns
    paths = {
        "meshed client -> meshed db (Service)": app(client, "banner", DB, "3306"),
        "meshed client -> legacy db (Service)": app(client, "banner", LEGACYDB, "3306"),
        "meshed client -> meshed db (pod IP)": app(client, "banner", mesh.ip("db"), "3306"),
        "legacy client -> meshed db (pod IP)": app(legacy, "banner", mesh.ip("db"), "3306"),
    }
    for path, result in paths.items():
        print(f"{path}: {result}")
        assert result["ok"], path
    assert paths["meshed client -> meshed db (Service)"]["greeting"] == "220 db ready"
    assert paths["meshed client -> legacy db (Service)"]["greeting"] == "220 legacy ready"
    # No listener filter ran into its timeout on either side: nothing waited for the client.
    for ns in (client, mesh.pods["db"].ns):
        name = "listener.127.0.0.1_" if ns is client else "listener.0.0.0.0_"
        counters = stats(ns, *(f"{name}{p}.downstream_pre_cx_timeout" for p in (15001, 15006)))
        assert set(counters.values()) == {0}, counters


def test_strict_pod_still_refuses_plaintext(mesh: Lab) -> None:
    result = app(mesh.pods["legacy"].ns, "get", mesh.ip("web-3"), "8080", "/")
    assert not result["ok"]


def test_graceful_scale_down_fails_no_request(mesh: Lab) -> None:
    client = mesh.pods["client"].ns
    stream = client.spawn([PYTHON, MESHAPP, "stream", WEB, "80", "4"], uid=APP_UID, gid=APP_UID)
    time.sleep(1)
    webs = [(n, mesh.ip(n)) for n in ("web-1", "web-3")]
    mesh.write("slice-web", _slice("web", 8080, webs))  # web-2 leaves the endpoints first

    def client_synced_without_web2() -> bool:
        status = mesh.debug("/debug/proxies")
        (proxy,) = [p for p in status["proxies"] if p["pod"] == "demo/client"]
        config = mesh.debug("/debug/config?pod=demo/client")
        eps = json.dumps(config["endpoints"])
        return bool(proxy["synced"]) and mesh.ip("web-2") not in eps

    deadline = time.monotonic() + 10
    while not client_synced_without_web2():
        assert time.monotonic() < deadline, "the client never got web-2's removal"
        time.sleep(0.05)
    for proc in mesh.runners["web-2"].procs.values():  # then the pod goes away
        proc.stop()
    summary = json.loads(stream.expect('"ok"', timeout=20).strip().splitlines()[-1])
    print("stream:", {k: v for k, v in summary.items() if k != "xfcc"})
    assert summary["failures"] == [] and summary["ok"] > 20
