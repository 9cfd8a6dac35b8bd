"""Keys, CSRs and ``openssl verify`` for tests that check what a peer would accept.

Certificates are verified with the openssl binary, not with the library that made them, so a
test proves what another TLS stack accepts.
"""

from __future__ import annotations

import subprocess
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from tests.conftest import require_tools

__all__ = ["make_csr", "openssl_verify", "openssl_verify_result", "rsa_key"]

# RSA key generation is slow: one key per size for the whole test session.
_RSA: dict[int, rsa.RSAPrivateKey] = {}


def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    """An RSA key of ``bits`` bits, made once per session and size."""
    if bits not in _RSA:
        _RSA[bits] = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return _RSA[bits]


def make_csr(
    key: object | None = None,
    *,
    cn: str | None = None,
    uris: tuple[str, ...] = (),
    dns: tuple[str, ...] = (),
) -> bytes:
    """A PEM CSR signed by ``key`` (a fresh P-256 key by default), with optional names."""
    private = key if key is not None else ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
    )
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    sans += [x509.DNSName(d) for d in dns]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    algorithm = None if isinstance(private, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(private, algorithm).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


def openssl_verify_result(
    tmp: Path,
    root_pem: str | bytes,
    cert_pem: str | bytes,
    *,
    purpose: str,
    at: datetime | None = None,
    hostname: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``openssl verify -CAfile root`` on ``cert_pem`` and return what it answered.

    ``at`` sets ``-attime`` (for certificates made with a shifted clock); ``hostname`` adds
    ``-verify_hostname``, the check a client makes against the name it dialled.
    """
    require_tools("openssl")
    ca_file, leaf = tmp / "verify-ca.pem", tmp / "verify-leaf.pem"
    ca_file.write_bytes(root_pem.encode() if isinstance(root_pem, str) else root_pem)
    leaf.write_bytes(cert_pem.encode() if isinstance(cert_pem, str) else cert_pem)
    cmd = ["openssl", "verify", "-CAfile", str(ca_file), "-purpose", purpose]
    if at is not None:
        cmd += ["-attime", str(int(at.timestamp()))]
    if hostname is not None:
        cmd += ["-verify_hostname", hostname]
    return subprocess.run([*cmd, str(leaf)], capture_output=True, text=True, check=False)


def openssl_verify(
    tmp: Path,
    root_pem: str | bytes,
    cert_pem: str | bytes,
    *,
    purpose: str,
    at: datetime | None = None,
    hostname: str | None = None,
) -> None:
    """``openssl verify`` must answer OK for ``cert_pem`` under ``root_pem``."""
    out = openssl_verify_result(tmp, root_pem, cert_pem, purpose=purpose, at=at, hostname=hostname)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout + out.stderr
