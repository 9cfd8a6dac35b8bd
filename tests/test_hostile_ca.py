"""Hostile clients of the CA endpoint: forged tokens, odd CSRs and floods, over real HTTPS.

A real `sidemesh serve` with a JWKS issuer. Every case is refused with its own status and
reason (never a 5xx, never the generic ``internal``), and no exception reaches a generic
handler (``sidemesh_unexpected_errors_total`` stays at 0).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from tests.support.jwks_issuer import Issuer
from tests.support.serve_process import Serve, assert_no_unexpected_errors

PATH = "/v1/certificates"
JSON = {"content-type": "application/json"}


def csr_pem(key: Any = None) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hostile")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def start(tmp: Path, issuer: Issuer, config: str, *args: str) -> Serve:
    (tmp / "mesh.yaml").write_text(config)
    jwks = issuer.write_jwks(tmp / "jwks.json")
    s = Serve(
        tmp,
        "--config",
        str(tmp / "mesh.yaml"),
        "--jwks-file",
        str(jwks),
        "--jwks-issuer",
        issuer.issuer_url,
        *args,
    )
    s.wait_ready()
    return s


@pytest.fixture(scope="module")
def server(issuer: Issuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    relaxed = "ca:\n  unauthenticated_per_address_per_minute: 10000\n"
    s = start(
        tmp_path_factory.mktemp("ca"), issuer, relaxed + "  rate_per_identity_per_minute: 10000\n"
    )
    try:
        yield s
    finally:
        s.kill()


@pytest.fixture(autouse=True)
def no_unexpected_errors(server: Serve) -> Iterator[None]:
    yield
    assert_no_unexpected_errors(server)


def post(
    s: Serve, token: str | None, body: Any, headers: dict[str, str] | None = None
) -> httpx.Response:
    sent = {**JSON, **(headers or {})}
    if token is not None:
        sent["authorization"] = f"Bearer {token}"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with s.client() as client:
        return client.post(PATH, content=content, headers=sent)


def refused(r: httpx.Response) -> tuple[int, str]:
    assert r.headers["content-type"].startswith("application/json"), r.text
    return r.status_code, r.json()["error"]


def _es256_over_rsa_key(issuer: Issuer) -> str:
    return Issuer.create(issuer.issuer_url, algorithm="ES256", kid=issuer.kid).token("shop", "cart")


def _named(issuer: Issuer, namespace: str, service_account: str) -> str:
    subject = f"system:serviceaccount:{namespace}:{service_account}"
    return issuer.token(namespace, service_account, subject=subject)


def _odd_kid(_issuer: Issuer) -> str:
    def part(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'RS256', 'kid': 123})}.{part({'sub': 'x'})}.c2ln"


NOT_SA = (403, "not-a-service-account")
TOO_LONG = (401, "token-lifetime-too-long")


TOKENS = [
    ("es256-header-rsa-key", _es256_over_rsa_key, (401, "invalid-token")),
    (
        "service-account-with-newline",
        lambda i: _named(i, "shop", "cart\n"),
        (403, "not-a-service-account"),
    ),
    (
        "namespace-with-newline",
        lambda i: _named(i, "shop\n", "cart"),
        (403, "not-a-service-account"),
    ),
    (
        "iat-in-the-future",
        lambda i: i.token("shop", "cart", extra={"iat": int(time.time()) + 3600}),
        (401, "token-not-yet-valid"),
    ),
    (
        "exp-1e300",
        lambda i: i.token("shop", "cart", extra={"exp": 1e300}),
        (401, "token-lifetime-too-long"),
    ),
    (
        "lifetime-of-a-year",
        lambda i: i.token("shop", "cart", ttl=365 * 86400),
        (401, "token-lifetime-too-long"),
    ),
    ("alg-none", lambda i: "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", (401, "invalid-token")),
    ("kid-not-a-string", lambda i: _odd_kid(i), (401, "invalid-token")),
]


@pytest.mark.parametrize(("name", "build", "expected"), TOKENS, ids=[t[0] for t in TOKENS])
def test_forged_tokens_are_refused_with_their_reason(
    server: Serve, issuer: Issuer, name: str, build: Any, expected: tuple[int, str]
) -> None:
    r = post(server, build(issuer), {"csr": csr_pem()})
    assert refused(r) == expected, r.text


CSRS = [
    ("not-pem", {"csr": "hello"}, (400, "malformed-csr")),
    ("not-a-string", {"csr": ["x"]}, (400, "bad-request")),
    ("ttl-a-bool", {"csr": "x", "ttlSeconds": True}, (400, "bad-ttl")),
    ("ttl-huge", {"csr": csr_pem(), "ttlSeconds": 10**30}, (400, "bad-ttl")),
    ("ttl-a-year", {"csr": csr_pem(), "ttlSeconds": 365 * 86400}, (400, "ttl-too-long")),
    ("a-list", [1, 2], (400, "bad-request")),
    ("deeply-nested", b"[" * 5000 + b"]" * 5000, (400, "bad-request")),
    ("not-json", b"\xff\xfe{", (400, "bad-request")),
]


@pytest.mark.parametrize(("name", "body", "expected"), CSRS, ids=[c[0] for c in CSRS])
def test_bad_requests_with_a_valid_token_are_refused(
    server: Serve, issuer: Issuer, name: str, body: Any, expected: tuple[int, str]
) -> None:
    r = post(server, issuer.token("shop", "cart"), body)
    assert refused(r) == expected, r.text


def test_a_csr_with_a_broken_signature_is_refused(server: Serve, issuer: Issuer) -> None:
    pem = csr_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0xFF  # inside the signature
    broken = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()
    r = post(server, issuer.token("shop", "cart"), {"csr": broken})
    assert r.status_code == 400 and r.json()["error"] != "internal", r.text


def test_the_ca_requires_application_json(server: Serve, issuer: Issuer) -> None:
    body = {"csr": csr_pem()}
    r = post(server, issuer.token("shop", "cart"), body, {"content-type": "text/plain"})
    assert refused(r) == (415, "content-type")
    assert post(server, issuer.token("shop", "cart"), body).status_code == 200


def test_a_body_above_the_limit_is_refused_413(server: Serve, issuer: Issuer) -> None:
    r = post(server, issuer.token("shop", "cart"), {"csr": "x" * (128 * 1024)})
    assert refused(r) == (413, "too-large")


def test_failed_authentication_is_rate_limited_per_source_address(
    tmp_path: Path, issuer: Issuer
) -> None:
    s = start(tmp_path, issuer, "ca:\n  unauthenticated_per_address_per_minute: 5\n")
    try:
        answers = [refused(post(s, "not.a.token", {"csr": csr_pem()})) for _ in range(8)]
        assert answers[:5] == [(401, "invalid-token")] * 5
        assert answers[5:] == [(429, "rate-limited-address")] * 3
        limited = post(s, issuer.token("shop", "cart"), {"csr": csr_pem()})
        assert limited.status_code == 429 and "retry-after" in limited.headers
    finally:
        s.kill()


def test_the_per_identity_limit_holds_across_workers(tmp_path: Path, issuer: Issuer) -> None:
    """``--workers 2`` does not double the configured per-identity rate."""
    s = start(tmp_path, issuer, "ca:\n  rate_per_identity_per_minute: 4\n", "--workers", "2")
    try:
        token = issuer.token("shop", "cart")
        codes = [post(s, token, {"csr": csr_pem()}).status_code for _ in range(12)]
        assert codes.count(200) <= 4, codes
        assert set(codes) <= {200, 429}, codes
    finally:
        s.stop()
