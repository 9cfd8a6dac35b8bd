"""The trust bundle and the CA signer, following ``ca.crt``/``ca.key`` like the serving cert.

``sidemesh serve`` puts the bundle (every root in ``ca.crt``) into each injected pod and signs
workload certificates with the root whose key is in ``ca.key``. Both come from one
:class:`TrustSnapshot`, so a pod never gets a bundle that lacks the root its proxy's
certificate will be signed by.

When: as the serving certificate (:class:`webhook.files.Reloading`, the one watcher): at most
every ``check_interval`` seconds, the request that finds the interval over ``stat()``s the
files and reloads only when one changed. Between checks a request costs one clock read. The
reload (parsing a few PEMs) runs inline, once per change.

What is refused (the old snapshot stays in use, a warning is logged, a failure counted): a
bundle with a cut-off certificate, an unparsable key, a key that belongs to none of the roots
(``ca.crt`` replaced before ``ca.key``, or the other way round), a key file gone missing. A
refused state is not retried until the files change again. The log names root fingerprints,
never key material.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from webhook.ca.authority import (
    CA_CERT,
    CA_KEY,
    CertificateAuthority,
    fingerprint_sha256,
    load_roots,
)
from webhook.errors import PKIError
from webhook.files import Reloading

__all__ = ["ReloadingTrust", "TrustSnapshot", "load_trust"]

LOG = logging.getLogger("sidemesh.trust")


@dataclass(frozen=True)
class TrustSnapshot:
    """One consistent reading of the cert dir."""

    bundle: str
    """Every root of ``ca.crt`` as PEM, re-encoded (comments and text dumps dropped)."""
    roots: tuple[x509.Certificate, ...]
    authority: CertificateAuthority | None
    """The signer (the root whose key is in ``ca.key``), ``None`` without ``ca.key``."""


def load_trust(cert_pem: bytes, key_pem: bytes | None, *, where: str = ".") -> TrustSnapshot:
    """A snapshot from file contents (pure). Raises :class:`PKIError` for anything refused."""
    roots = tuple(load_roots(cert_pem, where=f"{where}/{CA_CERT}"))
    bundle = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in roots)
    authority = None
    if key_pem is not None:
        authority = CertificateAuthority.from_pem(cert_pem, key_pem, where=where)
    return TrustSnapshot(bundle=bundle, roots=roots, authority=authority)


class ReloadingTrust:
    """The current :class:`TrustSnapshot` of ``cert_dir``; see the module doc for when.

    ``with_key`` (default: whether ``ca.key`` exists now) says whether a signer is expected;
    then a reload without a matching key is refused. ``on_reload(ok)`` is called after each
    reload attempt. The first load raises :class:`PKIError`: a broken start fails loudly.
    """

    def __init__(
        self,
        cert_dir: str | Path,
        *,
        check_interval: float = 1.0,
        with_key: bool | None = None,
        on_reload: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cert_dir = Path(cert_dir)
        self.with_key = (self.cert_dir / CA_KEY).exists() if with_key is None else with_key
        self._on_reload = on_reload
        files = (self.cert_dir / CA_CERT,) + ((self.cert_dir / CA_KEY,) if self.with_key else ())
        try:
            self._watch = Reloading(
                files,
                self._load,
                refuse=(OSError, PKIError),
                on_reload=self._reloaded,
                on_refused=self._refused,
                check_interval=check_interval,
                clock=clock,
            )
        except OSError as exc:
            raise PKIError(f"cannot read {exc.filename}: {exc.strerror}") from None

    @property
    def reloads(self) -> int:
        """How many times a changed bundle was taken into use."""
        return self._watch.reloads

    # --- the request path: one clock read, a stat at most every check_interval ----------------

    def snapshot(self) -> TrustSnapshot:
        return self._watch.poll()

    def bundle(self) -> str:
        """The PEM roots for the pods' ``sidemesh.io/trust-bundle`` annotation."""
        return self.snapshot().bundle

    def authority(self) -> CertificateAuthority:
        """The signer; :class:`PKIError` when this directory has no ``ca.key``."""
        authority = self.snapshot().authority
        if authority is None:
            raise PKIError(f"no {CA_KEY} in {self.cert_dir}: cannot sign")
        return authority

    # --- reloading -------------------------------------------------------------------------

    def check(self) -> bool:
        """Reload now if the files changed; ``True`` when a new snapshot is in use."""
        return self._watch.check()

    def _load(self) -> TrustSnapshot:
        cert_pem = (self.cert_dir / CA_CERT).read_bytes()
        key_pem = (self.cert_dir / CA_KEY).read_bytes() if self.with_key else None
        return load_trust(cert_pem, key_pem, where=str(self.cert_dir))

    def _refused(self, exc: Exception) -> None:
        LOG.warning(
            "trust bundle reload refused, keeping the old one: %s",
            exc,
            extra={"event": "trust-reload-failed", "dir": str(self.cert_dir)},
        )
        if self._on_reload is not None:
            self._on_reload(False)

    def _reloaded(self, snapshot: TrustSnapshot) -> None:
        signer = snapshot.authority
        LOG.info(
            "trust bundle reloaded",
            extra={
                "event": "trust-reload",
                "dir": str(self.cert_dir),
                "roots": [fingerprint_sha256(c) for c in snapshot.roots],
                "signer": fingerprint_sha256(signer.cert) if signer is not None else None,
            },
        )
        if self._on_reload is not None:
            self._on_reload(True)
