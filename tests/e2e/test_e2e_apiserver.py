"""The API server and DNS over TCP from a meshed pod, for real: they sit inside the mesh CIDRs
but have no sidecar, so the outbound listener must pass them through untouched.

:func:`meshlab.start_mesh` with ``kubelet_env``: the meshed pods' containers get
``KUBERNETES_SERVICE_HOST``/``_PORT`` (and ``_PORT_HTTPS``) the way the kubelet sets them in
every container, pointing at the sidecar-less ``outside`` pod, which here plays the API server:
an HTTPS server with a certificate from a CA of this test (not the mesh's). The client pod's
agent reads them from its own environment and renders the exemption into its bootstrap.

Checks: the app's own TLS reaches the "API server" through the capture (the server sees the
proxy's connection, the passthrough counters move) while the same server on another port, where
the outbound listener still applies mTLS, fails exactly as every port did before this fix (the
proxy refuses a server certificate that is not the mesh's); a DNS-over-TCP exchange with port
53 of a sidecar-less pod works; meshed client → meshed server is still mTLS, also on the port
number that has an exact-address exemption for another address.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import envoy_binary, require_root, require_tools
from tests.support.meshlab import (
    APP_UID,
    PYTHON,
    Mesh,
    app,
    checked_lab,
    is_direct,
    start_mesh,
    stats,
    trouble,
)
from tests.support.netns import Netns, NetnsLab, Pod
from tests.support.programs import PROGRAMS
from webhook.dataplane.bootstrap import TCP_CONNECT_ATTEMPTS

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.envoy]

API_PORT = 443
#: ``KUBERNETES_SERVICE_PORT_HTTPS`` is normally the same port; here it is the port the meshed
#: server (and the outside pod's plain app) listen on, to show that an exemption for one
#: address:port leaves every other address on that port meshed.
API_PORT_HTTPS = 8080
#: The same HTTPS server on a port without exemption: what every API call met before the fix.
OTHER_TLS_PORT = 6443
DNS_PORT = 53
CLIENT_ID = "spiffe://cluster.local/ns/demo/sa/client"
#: The "API server" and "kube-dns" (root: ports below 1024), and the client app (uid 1000).
SERVERS = str(PROGRAMS / "peer_servers.py")
CLIENT = str(PROGRAMS / "peer_client.py")

KEYS = (
    "tcp.outbound_apiserver.downstream_cx_total",
    "tcp.outbound_plain_53.downstream_cx_total",
    "cluster.passthrough.upstream_cx_total",
    "cluster.outbound_mesh_tcp.upstream_cx_total",
    "cluster.outbound_mesh_http.upstream_cx_total",
)


def _test_ca(where: Path, ip: str) -> tuple[Path, Path, Path]:
    """A CA of this test (not the mesh's) and a serving certificate for ``ip``."""
    now = datetime.now(UTC)

    def cert(
        subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: Any, ca: bool
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            san = x509.SubjectAlternativeName([x509.IPAddress(ip_address(ip))])
            builder = builder.add_extension(san, critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, leaf_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test apiserver CA")])
    ca_cert = cert("test apiserver CA", ca_key, ca_name, ca_key, True)
    leaf = cert("kube-apiserver", leaf_key, ca_name, ca_key, False)
    pem = serialization.Encoding.PEM
    paths = (where / "ca.crt", where / "tls.crt", where / "tls.key")
    paths[0].write_bytes(ca_cert.public_bytes(pem))
    paths[1].write_bytes(leaf.public_bytes(pem))
    paths[2].write_bytes(
        leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    for path in paths:
        path.chmod(0o644 if path.suffix == ".crt" else 0o600)
    return paths


def _client(ns: Netns, *args: str) -> dict[str, Any]:
    done = ns.run([PYTHON, CLIENT, *args], uid=APP_UID, gid=APP_UID, timeout=15)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("family", ["IPv4", "IPv6"])
def test_api_server_and_dns_over_tcp_pass_through_the_sidecar(family: str) -> None:
    """IPv6: dual-stack pods and an IPv6 ``KUBERNETES_SERVICE_HOST`` (an IPv6-first cluster)."""
    require_root()
    require_tools("ip", "iptables", "iptables-restore", "setpriv", "unshare")
    if family == "IPv6":
        require_tools("ip6tables-restore")
    envoy_binary()
    with checked_lab("smapi") as lab:

        def kubelet_env(apiserver: Pod) -> dict[str, str]:
            return {
                "KUBERNETES_SERVICE_HOST": _api_ip(apiserver, family),
                "KUBERNETES_SERVICE_PORT": str(API_PORT),
                "KUBERNETES_SERVICE_PORT_HTTPS": str(API_PORT_HTTPS),
            }

        mesh = start_mesh(lab, kubelet_env=kubelet_env, ipv6=family == "IPv6")
        _checks(lab, mesh, family)


def _api_ip(pod: Pod, family: str) -> str:
    ip = pod.ip6 if family == "IPv6" else pod.ip
    assert ip is not None
    return ip


def _delta(ns: Netns, before: dict[str, int]) -> dict[str, int]:
    after = stats(ns, *KEYS)
    return {k: after[k] - before[k] for k in KEYS if after[k] != before[k]}


def _checks(lab: NetnsLab, mesh: Mesh, family: str) -> None:
    client, server, apiserver = mesh.client, mesh.server, mesh.outside
    api_ip = _api_ip(apiserver, family)
    ca, crt, key = _test_ca(lab.tmpdir("apiserver-pki"), api_ip)
    tls_ports = f"{API_PORT},{OTHER_TLS_PORT}"
    servers = [PYTHON, SERVERS, str(crt), str(key), tls_ports, str(DNS_PORT)]
    apiserver.ns.spawn(servers).expect("listening")
    # The agent read the kubelet's variables from its own environment into its bootstrap.
    bootstrap = json.loads((client.volume_dirs["sidemesh-work"] / "envoy.json").read_text())
    outbound = bootstrap["static_resources"]["listeners"][0]
    exempt = {c["name"]: c["filter_chain_match"] for c in outbound["filter_chains"]}
    assert exempt[f"outbound-apiserver-{API_PORT}"]["prefix_ranges"] == [
        {"address_prefix": api_ip, "prefix_len": 32 if family == "IPv4" else 128}
    ]

    # (1) the app's own TLS to the API server's address:port, verified against the API
    # server's CA, passes through the sidecar as it is: the server sees the proxy's
    # connection, not the app's, and the passthrough counters moved, not the mesh ones.
    before = stats(client.ns, *KEYS)
    answer = _client(client.ns, "tls", api_ip, str(API_PORT), str(ca))
    problems = (answer, trouble(client.ns))
    assert answer["ok"] and answer["version"] == "TLSv1.3", problems
    assert not is_direct(answer), problems  # went through the capture
    assert _delta(client.ns, before) == {
        "tcp.outbound_apiserver.downstream_cx_total": 1,
        "cluster.passthrough.upstream_cx_total": 1,
    }, problems

    # (2) the same server on a port without the exemption: the proxy wraps the app's TLS in
    # mTLS and refuses the API server's certificate (not the mesh's): the app's call fails,
    # as every API call from a meshed pod did before.
    before = stats(client.ns, *KEYS)
    failed = _client(client.ns, "tls", api_ip, str(OTHER_TLS_PORT), str(ca))
    assert not failed["ok"], failed
    # A refused handshake is a failed connect: the proxy tries each one TCP_CONNECT_ATTEMPTS times.
    refused_cx = {"cluster.outbound_mesh_tcp.upstream_cx_total": TCP_CONNECT_ATTEMPTS}
    assert _delta(client.ns, before) == refused_cx

    # (3) DNS over TCP to port 53 of a sidecar-less pod inside the mesh CIDR: plain, proxied.
    before = stats(client.ns, *KEYS)
    dns = _client(client.ns, "dns", api_ip, str(DNS_PORT))
    assert dns["ok"] and not is_direct(dns), (dns, trouble(client.ns))
    assert _delta(client.ns, before) == {
        "tcp.outbound_plain_53.downstream_cx_total": 1,
        "cluster.passthrough.upstream_cx_total": 1,
    }

    # (4) the second API port (8080, exact address) is plain for the API server's address
    # only: the meshed server on the same port number still gets mTLS with the client's
    # identity, and the outside pod's plain app on it is reached through the exemption.
    before = stats(client.ns, *KEYS)
    meshed = app(client.ns, "get", server.pod_net.ip, str(API_PORT_HTTPS), "/still-mtls")
    assert meshed["ok"] and f"URI={CLIENT_ID}" in (meshed["xfcc"] or ""), meshed
    assert _delta(client.ns, before) == {"cluster.outbound_mesh_http.upstream_cx_total": 1}
    if family == "IPv6":
        # The exemption is for the exact address: the same server's IPv4 address on the API
        # port is still meshed (the proxy refuses its certificate, as in (2)).
        before = stats(client.ns, *KEYS)
        refused = _client(client.ns, "tls", apiserver.ip, str(API_PORT), str(ca))
        assert not refused["ok"], refused
        assert _delta(client.ns, before) == refused_cx
        return
    before = stats(client.ns, *KEYS)
    plain = app(client.ns, "get", apiserver.ip, str(API_PORT_HTTPS), "/apiserver-https-port")
    assert plain["ok"] and plain["status"] == 200 and not plain["xfcc"], plain
    assert not is_direct(plain), plain
    assert _delta(client.ns, before) == {
        "tcp.outbound_apiserver.downstream_cx_total": 1,
        "cluster.passthrough.upstream_cx_total": 1,
    }
