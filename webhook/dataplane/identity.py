"""The sidecar's identity: its key, its CSR, the CA call, and the certificate directory.

The private key is generated here, in the pod, and only ever written to the certificate
directory (a memory-backed emptyDir) with mode 0600. It is never logged, never sent.

The certificate directory is laid out the way the kubelet lays out Secret volumes, so that one
``rename`` switches key, certificate and bundle together::

    cert-dir/
      ..g000002/ key.pem cert.pem ca.crt     the current generation
      ..data -> ..g000002                    swapped atomically (rename of a new symlink)
      key.pem  -> ..data/key.pem             stable names Envoy's SDS files point at
      cert.pem -> ..data/cert.pem
      ca.crt   -> ..data/ca.crt

Envoy watches the directory; the rename of ``..data`` is the "moved to" event on which it
rereads the pair (and checks that key and certificate were read consistently). Connections
that are open keep their TLS session; new ones use the new certificate.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from webhook.dataplane.bootstrap import CERT_FILE, KEY_FILE, ROOT_FILE

__all__ = [
    "CARequestError",
    "Issued",
    "build_csr",
    "check_issued",
    "install_generation",
    "new_key",
    "renewal_time",
    "request_certificate",
]

_DATA = "..data"
_GEN_PREFIX = "..g"


class CARequestError(Exception):
    """The CA could not be reached or refused; the message says why (never key material)."""


@dataclass(frozen=True)
class Issued:
    """A certificate the CA issued for our key, checked."""

    chain_pem: str
    bundle_pem: str
    not_before: datetime
    not_after: datetime
    spiffe_id: str


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def build_csr(key: ec.EllipticCurvePrivateKey, spiffe_id: str) -> str:
    """A CSR naming the id we expect (the CA takes the id from the token, not from here)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def request_certificate(
    ca_address: str,
    *,
    csr_pem: str,
    token: str,
    bundle_file: Path,
    ttl_seconds: int | None,
    timeout: float = 10.0,
) -> tuple[str, str]:
    """``POST <ca>/v1/certificates``; returns (certificateChain, trustBundle) PEMs.

    The CA's serving certificate is verified against the trust bundle file (the mesh root that
    came with the pod spec), hostname included.
    """
    body: dict[str, object] = {"csr": csr_pem}
    if ttl_seconds:
        body["ttlSeconds"] = ttl_seconds
    req = urllib.request.Request(
        ca_address.rstrip("/") + "/v1/certificates",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method="POST",
    )
    try:
        ctx = ssl.create_default_context(cafile=str(bundle_file))
    except (OSError, ssl.SSLError) as exc:
        raise CARequestError(f"cannot use trust bundle {bundle_file}: {exc}") from None
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise CARequestError(f"CA refused: HTTP {exc.code} {_error_text(exc)}") from None
    except urllib.error.URLError as exc:
        raise CARequestError(f"CA unreachable at {ca_address}: {exc.reason}") from None
    except (OSError, ValueError) as exc:
        raise CARequestError(f"CA call failed: {exc}") from None
    try:
        return str(answer["certificateChain"]), str(answer["trustBundle"])
    except (KeyError, TypeError):
        raise CARequestError("CA answer lacks certificateChain/trustBundle") from None


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        data = json.loads(exc.read() or b"{}")
        return f"{data.get('error', '')}: {data.get('message', '')}".strip(": ")
    except (ValueError, OSError, AttributeError):
        return str(exc.reason)


def check_issued(
    key: ec.EllipticCurvePrivateKey, chain_pem: str, bundle_pem: str, spiffe_id: str
) -> Issued:
    """Refuse a chain whose leaf is not for our key or not for our SPIFFE id."""
    try:
        chain = x509.load_pem_x509_certificates(chain_pem.encode())
        x509.load_pem_x509_certificates(bundle_pem.encode())
    except ValueError as exc:
        raise CARequestError(f"CA answer is not PEM certificates: {exc}") from None
    leaf = chain[0]
    ours = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    theirs = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if ours != theirs:
        raise CARequestError("CA returned a certificate for a different key")
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if uris != [spiffe_id]:
        raise CARequestError(f"CA issued {uris} but this pod is {spiffe_id}")
    return Issued(
        chain_pem=chain_pem,
        bundle_pem=bundle_pem,
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        spiffe_id=spiffe_id,
    )


def renewal_time(issued: Issued, received: datetime) -> datetime:
    """Half of the lifetime *we* got. The CA back-dates ``notBefore`` (clock skew), so half of
    notBefore..notAfter could already be past; count from when the certificate arrived."""
    start = max(issued.not_before, received)
    return start + (issued.not_after - start) / 2


def install_generation(
    cert_dir: Path,
    key: ec.EllipticCurvePrivateKey,
    issued: Issued,
    *,
    owner: tuple[int, int] | None = None,
) -> Path:
    """Write a new generation and switch ``..data`` to it in one rename; drop older ones.

    ``owner``: (uid, gid) to give the files when the agent runs as root and Envoy does not.
    """
    cert_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(p.name for p in cert_dir.iterdir() if p.name.startswith(_GEN_PREFIX))
    number = int(existing[-1][len(_GEN_PREFIX) :]) + 1 if existing else 1
    gen = cert_dir / f"{_GEN_PREFIX}{number:06d}"
    gen.mkdir(mode=0o700)
    # The directory is not yet referenced, so the files can be written in place.
    _write(gen / KEY_FILE, key_pem(key), 0o600, owner)
    _write(gen / CERT_FILE, issued.chain_pem.encode(), 0o644, owner)
    _write(gen / ROOT_FILE, issued.bundle_pem.encode(), 0o644, owner)
    if owner is not None:
        os.chown(gen, *owner)
    tmp_link = cert_dir / f"{_DATA}.tmp"
    if tmp_link.is_symlink():
        tmp_link.unlink()
    os.symlink(gen.name, tmp_link)
    os.replace(tmp_link, cert_dir / _DATA)  # the atomic switch Envoy reacts to
    for name in (KEY_FILE, CERT_FILE, ROOT_FILE):
        link = cert_dir / name
        if not link.is_symlink():
            os.symlink(f"{_DATA}/{name}", link)
    for old in existing:
        shutil.rmtree(cert_dir / old, ignore_errors=True)
    return gen


def _write(path: Path, data: bytes, mode: int, owner: tuple[int, int] | None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if owner is not None:
        os.chown(path, *owner)
