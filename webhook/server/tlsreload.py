"""Serving-certificate hot reload: new handshakes get the new certificate, nobody fails.

How: uvicorn is given one *front* :class:`ssl.SSLContext` for its whole life. Its
``sni_callback`` runs inside every handshake, right after the ClientHello (with or without
SNI), and points that one connection at the *current* context — a complete context built
from the newest cert/key files. Building a fresh context instead of calling
``load_cert_chain`` again on the shared one matters: a writer that replaces ``tls.crt`` and
``tls.key`` one after the other leaves a moment where they do not match; loading the pair into
a new context fails cleanly there (OpenSSL checks the key against the cert) and we keep
serving the previous pair, whereas re-loading the shared context could leave it holding the
new cert with the old key and break every handshake until the next change.

When: at most every ``check_interval`` seconds, a handshake ``stat()``s both files (following
symlinks) and compares device, inode, size and mtime (:class:`webhook.files.Reloading`, the
watcher the trust bundle uses too). A mounted Secret is updated by the
kubelet with an atomic rename of the ``..data`` symlink, so both files change at once and the
new inode is seen by the first handshake after the swap. Connections already established keep
the certificate they were opened with; in-flight requests are never touched.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from webhook.files import Reloading

__all__ = ["ReloadingTLS", "make_server_context"]

LOG = logging.getLogger("sidemesh.tls")


def make_server_context(certfile: str | Path, keyfile: str | Path) -> ssl.SSLContext:
    """A server context: TLS 1.2 minimum (1.3 preferred by OpenSSL), HTTP/1.1 by ALPN."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    # No TLS 1.3 session tickets: the API server's Go client keeps no session cache, so every
    # ticket would be minted, encrypted and sent for nothing on each new connection.
    ctx.num_tickets = 0
    ctx.load_cert_chain(str(certfile), str(keyfile))
    return ctx


class ReloadingTLS:
    """The front context for the server plus the watcher that swaps certificates in.

    ``on_load(not_after, reloaded)`` is called after every successful load (for the expiry
    gauge), ``on_error()`` after a failed reload attempt (the old pair stays in use).
    """

    def __init__(
        self,
        certfile: str | Path,
        keyfile: str | Path,
        *,
        check_interval: float = 1.0,
        on_load: Callable[[float, bool], None] | None = None,
        on_error: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.certfile = Path(certfile)
        self.keyfile = Path(keyfile)
        self._on_load = on_load
        self._on_error = on_error
        # Half-written files or a cert/key mismatch are retried at the next check: a writer
        # replacing the pair one file after the other is normally done by then.
        self._watch = Reloading(
            (self.certfile, self.keyfile),
            self._load,
            refuse=(OSError, ssl.SSLError, ValueError),
            on_reload=self._reloaded,
            on_refused=self._refused,
            retry_refused=True,
            check_interval=check_interval,
            clock=clock,
        )
        self.front = self._watch.value[0]
        self.front.sni_callback = self._sni
        if on_load is not None:
            on_load(self.not_after, False)

    @property
    def current(self) -> ssl.SSLContext:
        return self._watch.value[0]

    @property
    def not_after(self) -> float:
        """The current certificate's expiry (UNIX time)."""
        return self._watch.value[1]

    @property
    def reloads(self) -> int:
        """How many times a changed pair was taken into use."""
        return self._watch.reloads

    def context_factory(self, *_args: object) -> ssl.SSLContext:
        """For ``uvicorn.Config(ssl_context_factory=...)``."""
        return self.front

    def check(self) -> bool:
        """Reload now if the files changed; ``True`` when a new certificate was loaded."""
        return self._watch.check()

    def _load(self) -> tuple[ssl.SSLContext, float]:
        ctx = make_server_context(self.certfile, self.keyfile)
        cert = x509.load_pem_x509_certificate(self.certfile.read_bytes())
        return ctx, cert.not_valid_after_utc.timestamp()

    def _refused(self, exc: Exception) -> None:
        LOG.warning("serving certificate reload failed, keeping the old one: %s", exc)
        if self._on_error is not None:
            self._on_error()

    def _reloaded(self, loaded: tuple[ssl.SSLContext, float]) -> None:
        not_after = loaded[1]
        LOG.info(
            "serving certificate reloaded",
            extra={"event": "cert-reload", "not_after": int(not_after), "cert": str(self.certfile)},
        )
        if self._on_load is not None:
            self._on_load(not_after, True)

    def _sni(
        self, conn: ssl.SSLSocket | ssl.SSLObject, _server_name: str | None, _ctx: ssl.SSLContext
    ) -> None:
        current = self._watch.poll()[0]
        if current is not self.front:
            conn.context = current
