"""The control plane programs a real Envoy over delta ADS (mTLS), and keeps it in step."""

from __future__ import annotations

import copy
import json
import queue
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from tests.conftest import envoy_binary
from tests.support.xds import (
    free_ports,
    make_ca,
    run_control_plane,
    run_envoy,
    workload_cert,
)
from webhook.cli.main import main
from webhook.dataplane.ads_bootstrap import XdsOptions
from webhook.dataplane.bootstrap import BootstrapOptions
from webhook.discovery.core import DiscoverySettings
from webhook.discovery.debug import DebugServer
from webhook.discovery.filesource import FileSource
from webhook.discovery.store import ObjectStore

pytestmark = pytest.mark.envoy

BACKEND = "outbound|8080||backend.demo.svc.cluster.local"
FRONTEND_ID = "spiffe://cluster.local/ns/demo/sa/frontend"


def _dynamic(dump: dict[str, Any], kind: str) -> dict[str, Any]:
    """Name → resource of the dynamic clusters/listeners/endpoints in a config dump."""
    out: dict[str, Any] = {}
    for section in dump["configs"]:
        t = section["@type"]
        if kind == "clusters" and t.endswith("ClustersConfigDump"):
            for c in section.get("dynamic_active_clusters", []):
                out[c["cluster"]["name"]] = c["cluster"]
        elif kind == "listeners" and t.endswith("ListenersConfigDump"):
            for x in section.get("dynamic_listeners", []):
                if "active_state" in x:
                    out[x["name"]] = x["active_state"]["listener"]
        elif kind == "routes" and t.endswith("RoutesConfigDump"):
            for r in section.get("dynamic_route_configs", []):
                out[r["route_config"]["name"]] = r["route_config"]
        elif kind == "endpoints" and t.endswith("EndpointsConfigDump"):
            for e in section.get("dynamic_endpoint_configs", []):
                cla = e["endpoint_config"]
                out[cla["cluster_name"]] = cla
    return out


def _addresses(cla: dict[str, Any]) -> set[str]:
    return {
        e["endpoint"]["address"]["socket_address"]["address"]
        for group in cla.get("endpoints", [])
        for e in group.get("lb_endpoints", [])
    }


@pytest.fixture
def mesh(tmp_path: Path) -> tuple[ObjectStore, Path]:
    store = ObjectStore()
    FileSource(store, None).load()
    ca = make_ca(tmp_path / "ca")
    workload_cert(ca, FRONTEND_ID, tmp_path / "frontend-certs")
    return store, tmp_path


def _opts(tmp_path: Path, ports: Any) -> BootstrapOptions:
    return BootstrapOptions(
        pod_name="frontend-1",
        pod_namespace="demo",
        service_account="frontend",
        cert_dir=str(tmp_path / "frontend-certs"),
        ports=ports,
    )


def test_envoy_gets_clusters_endpoints_listeners_and_follows_endpoint_changes(
    mesh: tuple[ObjectStore, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    store, tmp = mesh
    binary = envoy_binary()
    ports = free_ports()
    settings = DiscoverySettings(ports=ports, work_dir=str(tmp / "work"))
    with run_control_plane(store, settings, tmp / "ca") as cp:
        xds = XdsOptions(cp.address, initial_fetch_timeout_s=30)
        with run_envoy(binary, _opts(tmp, ports), xds, tmp / "work") as envoy:
            envoy.wait(lambda: envoy.get("/ready")[0] == 200, "Envoy ready")
            dump = envoy.config_dump()
            clusters = _dynamic(dump, "clusters")
            assert BACKEND in clusters
            assert {"outbound", "inbound"} <= set(_dynamic(dump, "listeners"))
            # backend's HTTP port: the outbound HCM asked for its routes over RDS and got them.
            (vhost,) = _dynamic(dump, "routes")[BACKEND]["virtual_hosts"]
            assert [r["route"]["cluster"] for r in vhost["routes"]] == [BACKEND]
            # One meshed and one plain replica: one mTLS socket, for exactly backend's id.
            (match,) = clusters[BACKEND]["transport_socket_matches"]
            assert match["match"] == {"tlsMode": "mutual_tls"}
            context = match["transport_socket"]["typed_config"]["common_tls_context"]
            sans = context["combined_validation_context"]["default_validation_context"]
            assert [m["matcher"]["exact"] for m in sans["match_typed_subject_alt_names"]] == [
                "spiffe://cluster.local/ns/demo/sa/backend"
            ]
            assert _addresses(_dynamic(dump, "endpoints")[BACKEND]) == {
                "10.244.0.11",
                "10.244.0.12",
            }

            # A third replica appears: Envoy has it without a restart.
            slice_ = copy.deepcopy(store.get("EndpointSlice", "demo", "backend-abc12"))
            assert slice_ is not None
            slice_["endpoints"].append(
                {"addresses": ["10.244.0.13"], "conditions": {"ready": True}}
            )
            store.upsert(slice_)

            def has_three() -> bool:
                cla = _dynamic(envoy.config_dump(), "endpoints")[BACKEND]
                return len(_addresses(cla)) == 3

            envoy.wait(has_three, "the new endpoint")
            status = cp.call(lambda: list(cp.discovery.proxies.values()))
            assert [(c.namespace, c.pod_name, c.spiffe_id) for c in status] == [
                ("demo", "frontend-1", FRONTEND_ID)
            ]
            _check_cli(cp, capsys)


def _check_cli(cp: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """`sidemesh proxy-status` and `proxy-config` read the control plane's debug endpoint."""
    debug = DebugServer(cp.discovery, cp.loop, "127.0.0.1", 0)
    debug.start()
    try:
        url = f"http://127.0.0.1:{debug.port}"
        capsys.readouterr()
        assert main(["proxy-status", "--url", url]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].split()[:2] == ["POD", "IDENTITY"]
        assert lines[1].split()[:2] == ["demo/frontend-1", FRONTEND_ID]
        assert main(["proxy-config", "demo/frontend-1", "--url", url, "--type", "endpoints"]) == 0
        out = capsys.readouterr().out
        assert f"{BACKEND}  10.244.0.11:8080 mTLS, 10.244.0.12:8080," in out
        assert main(["proxy-config", "demo/frontend-1", "--url", url, "--type", "routes"]) == 0
        assert f"{BACKEND}  1 routes" in capsys.readouterr().out
        assert main(["proxy-config", "demo/nope", "--url", url]) == 1
        assert "no proxy of pod 'demo/nope' is connected" in capsys.readouterr().err
    finally:
        debug.stop()


def _stub(address: str, cert_dir: Path) -> Any:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(cert_dir / "ca.crt").read_bytes(),
        private_key=(cert_dir / "key.pem").read_bytes(),
        certificate_chain=(cert_dir / "cert.pem").read_bytes(),
    )
    channel = grpc.secure_channel(
        address, creds, options=[("grpc.ssl_target_name_override", "localhost")]
    )
    return channel, ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)


def _first_response(stub: Any, node_id: str) -> Any:
    req = discovery_pb2.DeltaDiscoveryRequest(
        type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster"
    )
    req.node.id = node_id
    return next(iter(stub.DeltaAggregatedResources(iter([req]), timeout=10)))


def test_identity_comes_from_the_certificate_not_from_node_id(
    mesh: tuple[ObjectStore, Path],
) -> None:
    store, tmp = mesh
    with run_control_plane(store, DiscoverySettings(), tmp / "ca") as cp:
        channel, stub = _stub(cp.address, tmp / "frontend-certs")
        with channel:
            # frontend's certificate, claiming to be the backend pod: refused.
            with pytest.raises(grpc.RpcError) as err:
                _first_response(stub, "sidecar~backend-1.demo")
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "runs as backend" in (err.value.details() or "")
            # Its own pod: served.
            resp = _first_response(stub, "sidecar~frontend-1.demo")
            assert BACKEND in {r.name for r in resp.resources}


def test_a_client_without_a_mesh_certificate_is_refused(mesh: tuple[ObjectStore, Path]) -> None:
    store, tmp = mesh
    other = make_ca(tmp / "other-ca")
    workload_cert(other, FRONTEND_ID, tmp / "forged")
    (tmp / "forged" / "ca.crt").write_text((tmp / "ca" / "ca.crt").read_text())
    with run_control_plane(store, DiscoverySettings(), tmp / "ca") as cp:
        channel, stub = _stub(cp.address, tmp / "forged")
        with channel, pytest.raises(grpc.RpcError) as err:
            _first_response(stub, "sidecar~frontend-1.demo")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails


CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


def _cds_stream(stub: Any, timeout: float) -> tuple[queue.Queue[Any], Any, Any]:
    """An ADS stream of frontend-1 asking for clusters: the queue its requests are read from
    (None ends it), the stream, and the first response."""
    q: queue.Queue[Any] = queue.Queue()
    first = discovery_pb2.DeltaDiscoveryRequest(type_url=CDS)
    first.node.id = "sidecar~frontend-1.demo"
    q.put(first)
    stream = stub.DeltaAggregatedResources(iter(q.get, None), timeout=timeout)
    return q, stream, next(stream)


def test_nack_is_recorded_and_the_same_version_not_resent(mesh: tuple[ObjectStore, Path]) -> None:
    store, tmp = mesh
    with run_control_plane(store, DiscoverySettings(), tmp / "ca") as cp:
        channel, stub = _stub(cp.address, tmp / "frontend-certs")
        with channel:
            q, stream, resp = _cds_stream(stub, timeout=10)
            nack = discovery_pb2.DeltaDiscoveryRequest(type_url=CDS, response_nonce=resp.nonce)
            nack.error_detail.message = "test: rejected"
            q.put(nack)

            def nacked() -> Any:
                conns = list(cp.discovery.proxies.values())
                return conns[0].types[CDS].last_nack if conns else None

            import time

            for _ in range(100):
                record = cp.call(nacked)
                if record is not None:
                    break
                time.sleep(0.05)
            assert record is not None and record.message == "test: rejected"
            q.put(None)
            stream.cancel()
    json.dumps({})  # keep json imported for debugging dumps


def _served_serial(address: str, certs: Path) -> int:
    """The serial number of the certificate the ADS server presents in a new handshake."""
    import socket
    import ssl

    from cryptography import x509

    ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    ctx.check_hostname = False
    ctx.load_cert_chain(certs / "cert.pem", certs / "key.pem")
    ctx.set_alpn_protocols(["h2"])
    host, port = address.rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_a_replaced_xds_certificate_is_served_from_the_next_handshake_without_closing_streams(
    mesh: tuple[ObjectStore, Path],
) -> None:
    """The mounted pair (``xds.crt``/``xds.key``, e.g. Secret sidemesh-discovery-tls) is
    followed: after it is replaced, new connections get the new certificate, and a stream
    opened before keeps working — it still gets pushes."""
    import time
    from datetime import UTC, datetime, timedelta

    from webhook.ca.authority import CertificateAuthority
    from webhook.discovery.run import RunSettings, xds_credentials
    from webhook.files import write_atomic

    store, tmp = mesh
    certs = tmp / "ca"
    authority = CertificateAuthority.load(certs)

    def issue() -> int:
        pem, key = authority.issue_serving(
            ("localhost",), ("127.0.0.1",), now=datetime.now(UTC), ttl=timedelta(hours=1)
        )
        write_atomic(certs / "xds.key", key.encode(), mode=0o600)
        write_atomic(certs / "xds.crt", pem.encode(), mode=0o644)
        return x509_serial(pem)

    first_serial = issue()
    settings = RunSettings("127.0.0.1:0", "127.0.0.1", 0, certs, None, 1.0, DiscoverySettings())
    with run_control_plane(
        store, DiscoverySettings(), certs, credentials=lambda: xds_credentials(settings)
    ) as cp:
        assert _served_serial(cp.address, tmp / "frontend-certs") == first_serial
        channel, stub = _stub(cp.address, tmp / "frontend-certs")
        with channel:
            q, stream, resp = _cds_stream(stub, timeout=30)
            q.put(discovery_pb2.DeltaDiscoveryRequest(type_url=CDS, response_nonce=resp.nonce))

            second_serial = issue()
            deadline = time.monotonic() + 10
            while _served_serial(cp.address, tmp / "frontend-certs") != second_serial:
                assert time.monotonic() < deadline, "the new xDS certificate was never served"
                time.sleep(0.2)

            # The stream opened under the old certificate still gets pushes: a new Service.
            svc = copy.deepcopy(store.get("Service", "demo", "backend"))
            assert svc is not None
            svc["metadata"]["name"] = "backend-2"
            store.upsert(svc)
            pushed = next(stream)
            assert "outbound|8080||backend-2.demo.svc.cluster.local" in {
                r.name for r in pushed.resources
            }
            q.put(None)
            stream.cancel()


def x509_serial(pem: str) -> int:
    from cryptography import x509

    return x509.load_pem_x509_certificate(pem.encode()).serial_number
