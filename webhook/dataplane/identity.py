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

What the agent trusts: only the mesh root it was given with the pod spec (the downward-API
bundle file). A CA answer is a claim to check, not a fact: :func:`check_issued` installs
nothing that does not chain to that root, is not valid now, is not for exactly this pod's
SPIFFE ID and this pod's key, or is a CA. The ``ca.crt`` Envoy trusts is written from the
bundle file, never from the CA's ``trustBundle``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from webhook.dataplane.bootstrap import CERT_FILE, KEY_FILE, ROOT_FILE

__all__ = [
    "CLOCK_SKEW",
    "MIN_RENEWAL_INTERVAL",
    "CARequestError",
    "Issued",
    "build_csr",
    "check_issued",
    "install_generation",
    "load_bundle",
    "new_key",
    "renewal_time",
]

_DATA = "..data"
_GEN_PREFIX = "..g"
#: How far the CA's clock may run ahead of ours (a notBefore this far in the future is fine).
CLOCK_SKEW: Final = timedelta(seconds=60)
#: Never renew sooner than this after a certificate arrived, however short its life: a CA that
#: issues nearly expired certificates must not turn renewal into a loop.
MIN_RENEWAL_INTERVAL: Final = timedelta(seconds=5)
_MAX_CHAIN: Final = 8
_MAX_BUNDLE_BYTES: Final = 1 << 20


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


def load_bundle(bundle_file: Path) -> str:
    """The mesh root(s) from the pod's downward-API file, re-encoded as PEM (so that what Envoy
    trusts is exactly what was parsed). Unreadable or not certificates: a retryable error (the
    kubelet rewrites the file when the pod's annotation changes)."""
    try:
        raw = bundle_file.read_bytes()[:_MAX_BUNDLE_BYTES]
        roots = x509.load_pem_x509_certificates(raw)
    except (OSError, ValueError) as exc:
        raise CARequestError(f"trust bundle {bundle_file} is unusable: {exc}") from None
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in roots)


def check_issued(
    key: ec.EllipticCurvePrivateKey,
    chain_pem: str,
    bundle_pem: str,
    spiffe_id: str,
    *,
    now: datetime | None = None,
    skew: timedelta = CLOCK_SKEW,
) -> Issued:
    """Accept the CA's chain only if it is fit to hand to Envoy; ``CARequestError`` says why not.

    ``bundle_pem`` is the pod's own trust bundle (never the CA's answer). ``now`` defaults to the
    leaf's own notBefore (no clock: the tests of the pure checks); the agent passes its clock.
    """
    try:
        chain = x509.load_pem_x509_certificates(chain_pem.encode())
        roots = x509.load_pem_x509_certificates(bundle_pem.encode())
    except ValueError as exc:
        raise CARequestError(f"CA answer is not PEM certificates: {exc}") from None
    if len(chain) > _MAX_CHAIN:
        raise CARequestError(f"CA answered a chain of {len(chain)} certificates")
    leaf = chain[0]
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise CARequestError("CA returned a certificate for a different key")
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if uris != [spiffe_id]:
        raise CARequestError(f"CA issued {uris} but this pod is {spiffe_id}")
    if _is_ca(leaf):
        raise CARequestError("CA returned a CA certificate as the workload certificate")
    when = leaf.not_valid_before_utc if now is None else now
    if when + skew < leaf.not_valid_before_utc:
        raise CARequestError(f"certificate is not valid before {leaf.not_valid_before_utc}")
    if when >= leaf.not_valid_after_utc:
        raise CARequestError(f"certificate expired at {leaf.not_valid_after_utc}")
    # Checked at the latest instant the skew allows, so a slightly fast CA clock is no error.
    at = max(when, leaf.not_valid_before_utc)
    try:
        verifier = PolicyBuilder().store(Store(roots)).time(at).build_client_verifier()
        verifier.verify(leaf, chain[1:])
    except (VerificationError, ValueError) as exc:
        why = f"certificate does not chain to the pod's trust bundle: {exc}"
        raise CARequestError(why) from None
    return Issued(
        chain_pem="".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in chain),
        bundle_pem=bundle_pem,
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        spiffe_id=spiffe_id,
    )


def _spki(public: Any) -> bytes:
    return bytes(
        public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return True
    except x509.ExtensionNotFound:
        pass
    try:
        return bool(cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign)
    except x509.ExtensionNotFound:
        return False


def renewal_time(issued: Issued, received: datetime) -> datetime:
    """Half of the lifetime *we* got. The CA back-dates ``notBefore`` (clock skew), so half of
    notBefore..notAfter could already be past; count from when the certificate arrived."""
    start = max(issued.not_before, received)
    return max(start + (issued.not_after - start) / 2, received + MIN_RENEWAL_INTERVAL)


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
