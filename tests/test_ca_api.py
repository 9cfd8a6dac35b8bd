"""``POST /v1/certificates`` over real HTTPS: a small FastAPI app with the CA router, served by
uvicorn on 127.0.0.1 with a serving certificate from the same CA; the client trusts ca.crt only.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.support.ca_server import CAServer, post, serve_ca
from tests.support.jwks_issuer import Issuer
from tests.support.pki import make_csr, openssl_verify, rsa_key
from webhook.ca.api import VerifierOptions, router_from_config
from webhook.ca.authority import CertificateAuthority
from webhook.ca.serving import ensure_dev_pki
from webhook.ca.tokens import JWKSVerifier
from webhook.config import CAConfig, MeshConfig


@pytest.fixture(scope="module")
def server(issuer: Issuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CAServer]:
    ca = CAConfig(
        rate_per_identity_per_minute=1000,
        max_body_bytes=8192,
        unauthenticated_per_address_per_minute=1000,
    )
    config = MeshConfig(ca=ca)
    verifier = JWKSVerifier(issuer.issuer_url, jwks=issuer.jwks())
    with serve_ca(tmp_path_factory.mktemp("pki"), verifier, config) as srv:
        yield srv


def test_a_token_and_a_csr_give_a_spiffe_certificate(
    server: CAServer, issuer: Issuer, tmp_path: Path
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    token = issuer.token("shop", "cart", "cart-1")
    before = server.metric("sidemesh_ca_certificates_issued_total")
    resp = post(server, {"csr": make_csr(key).decode(), "ttlSeconds": 3600}, token)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"certificateChain", "trustBundle", "expiresAt", "spiffeId"}
    assert body["trustBundle"] == server.ca.root_pem
    assert body["spiffeId"] == "spiffe://cluster.local/ns/shop/sa/cart"
    openssl_verify(tmp_path, body["trustBundle"], body["certificateChain"], purpose="sslclient")
    cert = x509.load_pem_x509_certificate(body["certificateChain"].encode())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [body["spiffeId"]]
    assert cert.public_key() == key.public_key()
    expires = datetime.strptime(body["expiresAt"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert expires == cert.not_valid_after_utc
    assert timedelta(minutes=59) < expires - datetime.now(UTC) <= timedelta(hours=1)
    assert "PRIVATE KEY" not in resp.text
    assert server.metric("sidemesh_ca_certificates_issued_total") == before + 1
    assert server.metric("sidemesh_ca_signing_seconds_count") >= 1


def test_default_ttl_is_24_hours(server: CAServer, issuer: Issuer) -> None:
    resp = post(server, {"csr": make_csr().decode()}, issuer.token("shop", "cart"))
    cert = x509.load_pem_x509_certificate(resp.json()["certificateChain"].encode())
    left = cert.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(hours=23, minutes=59) < left <= timedelta(hours=24)


def test_a_csr_asking_for_another_identity_gets_the_tokens_identity(
    server: CAServer, issuer: Issuer
) -> None:
    forged = make_csr(
        cn="spiffe://cluster.local/ns/kube-system/sa/admin",
        uris=("spiffe://cluster.local/ns/kube-system/sa/admin",),
        dns=("sidemesh.sidemesh-system.svc",),
    )
    resp = post(server, {"csr": forged.decode()}, issuer.token("shop", "cart"))
    assert resp.status_code == 200
    cert = x509.load_pem_x509_certificate(resp.json()["certificateChain"].encode())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/shop/sa/cart")]
    assert len(cert.subject) == 0


def _refusals(issuer: Issuer) -> list[tuple[str, Any, str | None, int, str]]:
    good = make_csr().decode()
    return [
        ("no token", {"csr": good}, None, 401, "no-token"),
        ("not a jwt", {"csr": good}, "abc", 401, "invalid-token"),
        ("expired", {"csr": good}, issuer.token("a", "b", ttl=60, now=time.time() - 600), 401,
         "token-expired"),
        ("other audience", {"csr": good},
         issuer.token("a", "b", audience="https://kubernetes.default.svc"), 403, "wrong-audience"),
        ("not a service account", {"csr": good}, issuer.token("a", "b", subject="alice"), 403,
         "not-a-service-account"),
        ("not json", b"{csr", issuer.token("a", "b"), 400, "bad-request"),
        ("no csr", {"ttlSeconds": 60}, issuer.token("a", "b"), 400, "bad-request"),
        ("garbage csr", {"csr": "hello"}, issuer.token("a", "b"), 400, "malformed-csr"),
        ("weak key", {"csr": make_csr(rsa_key(1024)).decode()}, issuer.token("a", "b"), 400,
         "weak-key"),
        ("ttl above max", {"csr": good, "ttlSeconds": 8 * 86400}, issuer.token("a", "b"), 400,
         "ttl-too-long"),
        ("ttl not int", {"csr": good, "ttlSeconds": "1h"}, issuer.token("a", "b"), 400, "bad-ttl"),
        ("too large", {"csr": good + "x" * 9000}, issuer.token("a", "b"), 413, "too-large"),
    ]  # fmt: skip


def test_refusals_are_json_with_a_reason_and_counted(server: CAServer, issuer: Issuer) -> None:
    for name, body, token, status, reason in _refusals(issuer):
        before = server.metric("sidemesh_ca_refusals_total", reason=reason)
        resp = post(server, body, token)
        assert resp.status_code == status, (name, resp.text)
        answer = resp.json()
        assert answer["error"] == reason, name
        assert answer["message"], name
        assert server.metric("sidemesh_ca_refusals_total", reason=reason) == before + 1, name


def test_a_chunked_body_above_the_limit_is_413(server: CAServer, issuer: Issuer) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b"x" * 1024

    resp = post(server, None, issuer.token("a", "b"), content=chunks())
    assert resp.status_code == 413


def test_too_many_requests_for_one_identity_is_429(issuer: Issuer, tmp_path: Path) -> None:
    config = MeshConfig(ca=CAConfig(rate_per_identity_per_minute=2))
    verifier = JWKSVerifier(issuer.issuer_url, jwks=issuer.jwks())
    with serve_ca(tmp_path, verifier, config) as srv:
        body = {"csr": make_csr().decode()}
        codes = [post(srv, body, issuer.token("shop", "cart")).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        last = post(srv, body, issuer.token("shop", "cart"))
        assert last.json()["error"] == "rate-limited" and int(last.headers["retry-after"]) >= 1
        # Another identity has its own budget.
        assert post(srv, body, issuer.token("shop", "web")).status_code == 200


def test_no_private_key_or_token_in_any_log_line(
    server: CAServer, issuer: Issuer, caplog: pytest.LogCaptureFixture
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    root_key_body = (server.cert_dir / "ca.key").read_text().splitlines()[1]
    token = issuer.token("shop", "cart")
    caplog.set_level(logging.DEBUG)
    ok = post(server, {"csr": make_csr(key).decode()}, token)
    bad = post(server, {"csr": "junk"}, token)
    assert (ok.status_code, bad.status_code) == (200, 400)
    text = "\n".join(
        r.getMessage() + " " + " ".join(f"{k}={v}" for k, v in vars(r).items())
        for r in caplog.records
    )
    assert "certificate issued" in text  # the log is there, and says the identity
    assert "spiffe://cluster.local/ns/shop/sa/cart" in text
    for secret in (key_pem.splitlines()[1], root_key_body, token, "PRIVATE KEY"):
        assert secret not in text
        assert secret not in ok.text + bad.text


def test_router_needs_the_root_key_and_a_verifier(tmp_path: Path) -> None:
    ensure_dev_pki(tmp_path, now=datetime.now(UTC))
    assert router_from_config(MeshConfig(), tmp_path, VerifierOptions()) is None  # no verifier
    (tmp_path / "ca.key").unlink()
    issuer = Issuer.create(algorithm="ES256")
    assert router_from_config(MeshConfig(), tmp_path, JWKSVerifier("x", jwks=issuer.jwks())) is None


def test_verifier_options_from_flags_and_environment(tmp_path: Path) -> None:
    issuer = Issuer.create(algorithm="ES256")
    path = issuer.write_jwks(tmp_path / "jwks.json")
    env = {"SIDEMESH_JWKS_FILE": str(path), "SIDEMESH_JWKS_ISSUER": issuer.issuer_url}
    opts = VerifierOptions.from_env(env)
    assert opts == VerifierOptions(jwks_file=str(path), jwks_issuer=issuer.issuer_url)
    assert isinstance(opts.build(), JWKSVerifier)
    flagged = VerifierOptions.from_env(env, jwks_issuer="https://other")
    assert flagged.jwks_issuer == "https://other"
    assert VerifierOptions.from_env({}).build() is None  # not in a cluster, nothing configured


# --- mutual TLS with two issued workload certificates --------------------------------------


def _workload_context(
    server: CAServer, issuer: Issuer, sa: str, tmp: Path, *, side: ssl._SSLMethod
) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    resp = post(server, {"csr": make_csr(key).decode()}, issuer.token("shop", sa))
    assert resp.status_code == 200
    (tmp / f"{sa}.crt").write_text(resp.json()["certificateChain"])
    (tmp / f"{sa}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp / "bundle.pem").write_text(resp.json()["trustBundle"])
    ctx = ssl.SSLContext(side)
    ctx.check_hostname = False  # SPIFFE peers are checked by URI SAN, not host name
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(tmp / "bundle.pem")
    ctx.load_cert_chain(tmp / f"{sa}.crt", tmp / f"{sa}.key")
    return ctx


def _peer_uri(sock: ssl.SSLSocket) -> str:
    peer = sock.getpeercert()
    assert peer is not None
    sans = cast(tuple[tuple[str, str], ...], peer.get("subjectAltName", ()))
    uris = [v for k, v in sans if k == "URI"]
    assert len(uris) == 1
    return str(uris[0])


def test_two_workloads_do_mutual_tls_and_read_each_others_spiffe_id(
    server: CAServer, issuer: Issuer, tmp_path: Path
) -> None:
    srv_ctx = _workload_context(server, issuer, "backend", tmp_path, side=ssl.PROTOCOL_TLS_SERVER)
    cli_ctx = _workload_context(server, issuer, "frontend", tmp_path, side=ssl.PROTOCOL_TLS_CLIENT)
    listener = socket.create_server(("127.0.0.1", 0))
    seen: dict[str, str] = {}

    def accept() -> None:
        conn, _ = listener.accept()
        with srv_ctx.wrap_socket(conn, server_side=True) as tls:
            seen["server saw"] = _peer_uri(tls)
            tls.sendall(b"hello " + seen["server saw"].encode())

    t = threading.Thread(target=accept)
    t.start()
    with (
        socket.create_connection(listener.getsockname()) as raw,
        cli_ctx.wrap_socket(raw) as tls,
    ):
        seen["client saw"] = _peer_uri(tls)
        data = tls.recv(1024)
    t.join(timeout=10)
    listener.close()
    assert seen == {
        "server saw": "spiffe://cluster.local/ns/shop/sa/frontend",
        "client saw": "spiffe://cluster.local/ns/shop/sa/backend",
    }
    assert data == b"hello spiffe://cluster.local/ns/shop/sa/frontend"


def test_a_certificate_from_another_root_fails_the_handshake(
    server: CAServer, issuer: Issuer, tmp_path: Path
) -> None:
    srv_ctx = _workload_context(server, issuer, "backend", tmp_path, side=ssl.PROTOCOL_TLS_SERVER)
    rogue = CertificateAuthority.create(now=datetime.now(UTC))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = rogue.sign_workload(
        make_csr(key), "spiffe://cluster.local/ns/shop/sa/frontend",
        now=datetime.now(UTC), ttl=timedelta(hours=1),
    )  # fmt: skip
    (tmp_path / "rogue.crt").write_text(cert)
    (tmp_path / "rogue.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cli_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cli_ctx.check_hostname = False
    cli_ctx.load_verify_locations(tmp_path / "bundle.pem")
    cli_ctx.load_cert_chain(tmp_path / "rogue.crt", tmp_path / "rogue.key")
    listener = socket.create_server(("127.0.0.1", 0))
    errors: list[Exception] = []

    def accept() -> None:
        conn, _ = listener.accept()
        try:
            with srv_ctx.wrap_socket(conn, server_side=True):
                pass
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    t = threading.Thread(target=accept)
    t.start()
    with (
        socket.create_connection(listener.getsockname()) as raw,
        contextlib.suppress(ssl.SSLError, OSError),
        cli_ctx.wrap_socket(raw) as tls,
    ):
        tls.recv(1)  # TLS 1.3: the server's verdict on our cert arrives after the handshake
    t.join(timeout=10)
    listener.close()
    assert errors and "certificate" in str(errors[0]).lower()


class _BrokenVerifier:
    async def verify(self, token: str) -> Any:
        raise RuntimeError("verifier bug")


def test_an_unexpected_error_is_a_json_500_without_the_token_in_the_log(
    tmp_path: Path, issuer: Issuer, caplog: pytest.LogCaptureFixture
) -> None:
    token = issuer.token("shop", "cart")
    caplog.set_level(logging.DEBUG)
    with serve_ca(tmp_path, _BrokenVerifier()) as srv:
        resp = post(srv, {"csr": make_csr().decode()}, token)
        assert resp.status_code == 500
        assert resp.json()["error"] == "internal"
        assert srv.metric("sidemesh_ca_refusals_total", reason="internal") == 1
    assert "unexpected error" in caplog.text and token not in caplog.text
