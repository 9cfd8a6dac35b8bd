"""The CA core: the root, serving certificates and workload certificates, checked with openssl.

Every issued certificate is verified by ``openssl verify -CAfile`` against the root and then
parsed: names, usages and validity are what a peer will actually look at.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.support.pki import make_csr, openssl_verify, rsa_key
from webhook.ca.authority import CLOCK_SKEW, DEFAULT_SERVING_DNS, CertificateAuthority, resolve_ttl
from webhook.ca.serving import ensure_dev_pki, serving_cert_needs_renewal
from webhook.config import CAConfig
from webhook.errors import IdentityError, PKIError

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
SPIFFE = "spiffe://cluster.local/ns/shop/sa/cart"


def ext(cert: x509.Certificate, cls: type) -> x509.Extension:  # type: ignore[type-arg]
    return cert.extensions.get_extension_for_class(cls)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(now=NOW)


# --- the root ----------------------------------------------------------------------------


def test_root_is_a_p256_ca_for_ten_years(ca: CertificateAuthority, tmp_path: Path) -> None:
    cert = x509.load_pem_x509_certificate(ca.root_pem.encode())
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    assert ext(cert, x509.BasicConstraints).value.ca is True
    assert ext(cert, x509.KeyUsage).value.key_cert_sign is True
    life = cert.not_valid_after_utc - NOW
    assert timedelta(days=3649) < life <= timedelta(days=3650)
    openssl_verify(tmp_path, ca.root_pem, ca.root_pem, purpose="any", at=NOW)


def test_save_writes_key_0600_and_load_round_trips(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    ca.save(tmp_path / "pki")
    assert (tmp_path / "pki" / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "pki" / "ca.crt").stat().st_mode & 0o777 == 0o644
    loaded = CertificateAuthority.load(tmp_path / "pki")
    assert loaded.root_pem == ca.root_pem
    # The loaded CA signs certificates that chain to the saved root.
    cert = loaded.sign_workload(make_csr(), SPIFFE, now=NOW, ttl=timedelta(hours=1))
    openssl_verify(tmp_path, ca.root_pem, cert, purpose="sslclient", at=NOW)


def test_load_refuses_a_key_that_belongs_to_another_root(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    ca.save(tmp_path)
    other = CertificateAuthority.create(now=NOW)
    (tmp_path / "ca.crt").write_text(other.root_pem)
    with pytest.raises(PKIError, match="does not belong"):
        CertificateAuthority.load(tmp_path)


def test_load_of_an_empty_directory_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="sidemesh ca init"):
        CertificateAuthority.load(tmp_path)


# --- serving certificates ------------------------------------------------------------------


def test_serving_cert_has_the_service_names_and_verifies(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    cert_pem, key_pem = ca.issue_serving(now=NOW, ttl=timedelta(days=90))
    openssl_verify(tmp_path, ca.root_pem, cert_pem, purpose="sslserver", at=NOW)
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == list(DEFAULT_SERVING_DNS)
    assert "sidemesh.sidemesh-system.svc" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert ext(cert, x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH]
    )
    assert ext(cert, x509.BasicConstraints).value.ca is False
    assert cert.not_valid_after_utc == NOW + timedelta(days=90)
    key = serialization.load_pem_private_key(key_pem.encode(), None)
    assert key.public_key() == cert.public_key()


def test_serving_cert_with_custom_names(ca: CertificateAuthority, tmp_path: Path) -> None:
    cert_pem, _ = ca.issue_serving(["mesh.example"], ["10.1.2.3", "::1"], now=NOW)
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mesh.example"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3", "::1"]
    with pytest.raises(PKIError, match="not an IP"):
        ca.issue_serving(["x"], ["10.1.2"], now=NOW)


# --- workload certificates -----------------------------------------------------------------


@pytest.mark.parametrize(
    "kind",
    ["p256", "p384", "rsa2048", "ed25519"],
)
def test_workload_cert_for_each_accepted_key(
    ca: CertificateAuthority, tmp_path: Path, kind: str
) -> None:
    key: Any = {
        "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
        "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
        "rsa2048": lambda: rsa_key(2048),
        "ed25519": ed25519.Ed25519PrivateKey.generate,
    }[kind]()
    pem = ca.sign_workload(make_csr(key), SPIFFE, now=NOW, ttl=timedelta(hours=24))
    openssl_verify(tmp_path, ca.root_pem, pem, purpose="sslclient", at=NOW)
    openssl_verify(tmp_path, ca.root_pem, pem, purpose="sslserver", at=NOW)
    cert = x509.load_pem_x509_certificate(pem.encode())
    assert cert.public_key() == key.public_key()
    assert len(cert.subject) == 0
    san = ext(cert, x509.SubjectAlternativeName)
    assert san.critical is True  # empty subject: the SAN is the identity (RFC 5280)
    assert list(san.value) == [x509.UniformResourceIdentifier(SPIFFE)]
    usage = ext(cert, x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert usage.value.key_encipherment is (kind == "rsa2048")
    assert not usage.value.key_cert_sign
    assert set(ext(cert, x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    }
    assert ext(cert, x509.BasicConstraints).value.ca is False
    assert cert.not_valid_before_utc == NOW - CLOCK_SKEW
    assert cert.not_valid_after_utc == NOW + timedelta(hours=24)


def test_names_in_the_csr_are_ignored(ca: CertificateAuthority) -> None:
    forged = make_csr(
        cn="admin",
        uris=("spiffe://cluster.local/ns/kube-system/sa/admin",),
        dns=("kubernetes.default.svc",),
    )
    cert = x509.load_pem_x509_certificate(
        ca.sign_workload(forged, SPIFFE, now=NOW, ttl=timedelta(hours=1)).encode()
    )
    assert len(cert.subject) == 0
    assert list(ext(cert, x509.SubjectAlternativeName).value) == [
        x509.UniformResourceIdentifier(SPIFFE)
    ]


def test_workload_cert_never_outlives_the_root(tmp_path: Path) -> None:
    short = CertificateAuthority.create(now=NOW, days=1)
    pem = short.sign_workload(make_csr(), SPIFFE, now=NOW, ttl=timedelta(days=7))
    cert = x509.load_pem_x509_certificate(pem.encode())
    assert cert.not_valid_after_utc == short.not_after
    later = NOW + timedelta(days=2)
    with pytest.raises(PKIError, match="expired"):
        short.sign_workload(make_csr(), SPIFFE, now=later, ttl=timedelta(hours=1))


@pytest.mark.parametrize(
    ("make_key", "reason"),
    [
        (lambda: rsa_key(1024), "weak-key"),
        (lambda: ec.generate_private_key(ec.SECP521R1()), "weak-key"),
        (lambda: ec.generate_private_key(ec.SECP256K1()), "weak-key"),
    ],
    ids=["rsa1024", "p521", "secp256k1"],
)
def test_keys_outside_the_accepted_set_are_refused(
    ca: CertificateAuthority, make_key: object, reason: str
) -> None:
    with pytest.raises(IdentityError) as err:
        ca.sign_workload(make_csr(make_key()), SPIFFE, now=NOW, ttl=timedelta(hours=1))  # type: ignore[operator]
    assert (err.value.status, err.value.reason) == (400, reason)


def test_a_csr_whose_signature_does_not_verify_is_refused(ca: CertificateAuthority) -> None:
    # A CSR that still parses but whose proof of possession of the key no longer holds.
    der = bytearray(x509.load_pem_x509_csr(make_csr()).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # flip a bit inside the signature
    pem = b"-----BEGIN CERTIFICATE REQUEST-----\n"
    pem += base64.encodebytes(bytes(der)) + b"-----END CERTIFICATE REQUEST-----\n"
    with pytest.raises(IdentityError) as err:
        ca.sign_workload(pem, SPIFFE, now=NOW, ttl=timedelta(hours=1))
    assert err.value.status == 400
    assert err.value.reason == "bad-csr-signature"


@pytest.mark.parametrize("junk", ["", "hello", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"])
def test_garbage_is_a_malformed_csr(ca: CertificateAuthority, junk: str) -> None:
    with pytest.raises(IdentityError) as err:
        ca.sign_workload(junk, SPIFFE, now=NOW, ttl=timedelta(hours=1))
    assert (err.value.status, err.value.reason) == (400, "malformed-csr")


# --- TTL policy --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "expected"),
    [(None, 86400), (3600, 3600), (10, 10), (7 * 86400, 7 * 86400)],
)
def test_ttl_within_bounds(requested: int | None, expected: int) -> None:
    assert resolve_ttl(requested, CAConfig()) == timedelta(seconds=expected)


@pytest.mark.parametrize(
    ("requested", "reason"),
    [(7 * 86400 + 1, "ttl-too-long"), (9, "ttl-too-short"), (True, "bad-ttl"), ("60", "bad-ttl")],
)
def test_ttl_outside_bounds_is_refused_not_clamped(requested: object, reason: str) -> None:
    with pytest.raises(IdentityError) as err:
        resolve_ttl(requested, CAConfig())  # type: ignore[arg-type]
    assert (err.value.status, err.value.reason) == (400, reason)


# --- the development PKI on disk ---------------------------------------------------------------


def test_ensure_dev_pki_creates_then_keeps_then_renews(tmp_path: Path) -> None:
    d = tmp_path / "certs"
    ensure_dev_pki(d, now=NOW)
    root, tls = (d / "ca.crt").read_text(), (d / "tls.crt").read_text()
    openssl_verify(tmp_path, root, tls, purpose="sslserver", at=NOW)
    assert (d / "tls.key").stat().st_mode & 0o777 == 0o600
    # A second run a day later changes nothing.
    ensure_dev_pki(d, now=NOW + timedelta(days=1))
    assert (d / "ca.crt").read_text() == root and (d / "tls.crt").read_text() == tls
    # In the last third of its 90 days, the serving cert is renewed; the root is kept.
    later = NOW + timedelta(days=61)
    ensure_dev_pki(d, now=later)
    assert (d / "ca.crt").read_text() == root
    assert (d / "tls.crt").read_text() != tls
    openssl_verify(tmp_path, root, (d / "tls.crt").read_text(), purpose="sslserver", at=later)


def test_a_serving_cert_from_another_root_needs_renewal(ca: CertificateAuthority) -> None:
    other = CertificateAuthority.create(now=NOW)
    mine, _ = ca.issue_serving(now=NOW)
    theirs, _ = other.issue_serving(now=NOW)
    assert not serving_cert_needs_renewal(mine.encode(), ca, now=NOW)
    assert serving_cert_needs_renewal(theirs.encode(), ca, now=NOW)
    assert serving_cert_needs_renewal(None, ca, now=NOW)
    assert serving_cert_needs_renewal(b"junk", ca, now=NOW)


def test_the_serving_certificates_name_each_control_plane_service_every_way_it_is_reached() -> None:
    from webhook import names
    from webhook.ca.authority import DEFAULT_SERVING_DNS, SERVICE_DNS_NAMES

    assert names.control_plane_dns_names("sidemesh-discovery") == (
        "sidemesh-discovery",
        "sidemesh-discovery.sidemesh-system",
        "sidemesh-discovery.sidemesh-system.svc",
        "sidemesh-discovery.sidemesh-system.svc.cluster.local",
    )
    assert SERVICE_DNS_NAMES[2] == "sidemesh.sidemesh-system.svc"
    assert (*SERVICE_DNS_NAMES, "localhost") == DEFAULT_SERVING_DNS
