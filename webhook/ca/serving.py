"""The serving certificate on disk: when it is due for renewal, how its pair is written, and
the development PKI (a root plus a serving certificate) that ``sidemesh ca init`` and a local
``sidemesh serve`` start from.

Clock and directory are parameters, as in :mod:`webhook.ca.authority`.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from cryptography import x509

from webhook.ca.authority import (
    CA_CERT,
    CA_KEY,
    TLS_CERT,
    TLS_KEY,
    CertificateAuthority,
    private_dir,
)
from webhook.files import write_atomic

__all__ = ["ensure_dev_pki", "serving_cert_needs_renewal", "write_serving_pair"]

#: A serving certificate is renewed once less than this fraction of its lifetime is left.
_RENEW_FRACTION = 1 / 3


def serving_cert_needs_renewal(
    cert_pem: bytes | None, ca: CertificateAuthority, *, now: datetime
) -> bool:
    """True when the serving cert is missing, unreadable, not from ``ca``, or in its last third."""
    if not cert_pem:
        return True
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return True
    if not ca.issued(cert):
        return True
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return now >= end - (end - start) * _RENEW_FRACTION


def ensure_dev_pki(directory: str | Path, *, now: datetime) -> None:
    """Make ``directory`` a working PKI: a root when none exists, and a serving certificate
    (default names) when it is missing, not from this root, or in the last third of its life.
    An existing root is never replaced."""
    d = Path(directory)
    private_dir(d)
    if (d / CA_CERT).exists() or (d / CA_KEY).exists():
        ca = CertificateAuthority.load(d)
    else:
        ca = CertificateAuthority.create(now=now)
        ca.save(d)
    try:
        current: bytes | None = (d / TLS_CERT).read_bytes()
    except OSError:
        current = None
    if serving_cert_needs_renewal(current, ca, now=now) or not (d / TLS_KEY).exists():
        cert_pem, key_pem = ca.issue_serving(now=now)
        write_serving_pair(d, cert_pem, key_pem)


def write_serving_pair(directory: Path, cert_pem: str, key_pem: str) -> None:
    """Write ``tls.key`` (0600) then ``tls.crt``, each atomically.

    The key goes first: a reader that reloads on a change of ``tls.crt`` then finds the
    matching key already in place."""
    write_atomic(directory / TLS_KEY, key_pem.encode(), mode=0o600)
    write_atomic(directory / TLS_CERT, cert_pem.encode(), mode=0o644)
