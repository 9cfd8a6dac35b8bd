"""The CA's upkeep: the cluster and the serving certificate kept in step with the root.

:class:`CAUpkeep` is the companion service the server's lifespan runs: it patches the
``caBundle`` of the MutatingWebhookConfiguration when the root changes and renews the serving
certificate before it expires — in the cert dir when that is writable, else (in a cluster,
where the dir is the read-only Secret mount) in Secret ``sidemesh-tls`` — and the server's TLS
reloader picks the new files up.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING

from cryptography import x509

from webhook import names
from webhook.ca.authority import (
    CA_CERT,
    CA_KEY,
    TLS_CERT,
    TLS_KEY,
    CertificateAuthority,
    load_roots,
)
from webhook.ca.serving import serving_cert_needs_renewal, write_serving_pair
from webhook.config import MeshConfig
from webhook.errors import SidemeshError

if TYPE_CHECKING:
    from webhook.kube.client import KubeClient

__all__ = ["CAUpkeep", "upkeep_from_config"]

log = logging.getLogger("sidemesh.ca")


class CAUpkeep:
    """Keeps the cluster and the serving certificate in step with the root.

    Every ``interval`` seconds (and once at start): if ``kube`` is set and the root in
    ``cert_dir`` differs from what was last patched, patch the webhook configuration's
    ``caBundle``; if this process holds the root key, renew ``tls.crt``/``tls.key`` once they
    are in the last third of their life (names kept from the current certificate). Where:
    in ``cert_dir`` when it is writable (a file lock serialises workers); else through ``kube``
    in Secret ``sidemesh-tls`` (resourceVersion-guarded, so one replica wins and the others
    find it fresh); else nowhere, with one warning that says to re-run ``sidemesh install``.
    Failures are logged and retried on the next round; they never stop the server.
    """

    def __init__(
        self,
        cert_dir: Path,
        *,
        config: MeshConfig,
        kube: KubeClient | None = None,
        webhook_config: str = names.WEBHOOK_CONFIGURATION,
        interval: float = 60.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_serving_cert_renewed: Callable[[], None] | None = None,
    ) -> None:
        self.cert_dir = Path(cert_dir)
        self.config = config
        self.kube = kube
        self.webhook_config = webhook_config
        self.interval = interval
        self.clock = clock
        self.on_serving_cert_renewed = on_serving_cert_renewed
        self.patched_root: str | None = None
        self._warned_read_only = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.run_once()
        self._task = asyncio.create_task(self._loop(), name="sidemesh-ca-upkeep")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.run_once()

    async def run_once(self) -> None:
        """One round of upkeep (blocking work runs in a thread)."""
        try:
            await asyncio.to_thread(self._renew_serving_cert)
        except (OSError, SidemeshError) as exc:
            log.warning("serving certificate renewal failed: %s", exc)
        if self.kube is not None:
            try:
                await asyncio.to_thread(self._patch_bundle)
            except (OSError, SidemeshError) as exc:
                log.warning("caBundle patch of %s failed: %s", self.webhook_config, exc)

    def _patch_bundle(self) -> None:
        assert self.kube is not None
        raw = (self.cert_dir / CA_CERT).read_bytes()
        root = raw.decode("ascii")
        if root == self.patched_root:
            return
        # Never a half-written bundle into the API server's trust: raises PKIError, and the
        # next round looks again.
        load_roots(raw, where=str(self.cert_dir / CA_CERT))
        self.kube.patch_ca_bundle(root, self.webhook_config)
        self.patched_root = root

    def _renewal_due(self) -> tuple[CertificateAuthority, bytes | None] | None:
        """The CA and the current serving cert when it must be renewed, else ``None``."""
        ca = CertificateAuthority.load(self.cert_dir)
        current = self._read_mounted_cert()
        if serving_cert_needs_renewal(current, ca, now=self.clock()):
            return ca, current
        return None

    def _renew_serving_cert(self) -> bool:
        # Check before locking: a read-only Secret mount with a fresh cert never needs the lock.
        if not (self.cert_dir / CA_KEY).exists() or self._renewal_due() is None:
            self._warned_read_only = False  # a later due period deserves its own warning
            return False
        lock = self._open_lock()
        if lock is None:
            # The cert dir is read-only: in a cluster it is the mounted Secret
            # (docs/CONTRACTS.md, section 5).
            if self.kube is not None:
                return self._renew_in_secret(self.kube)
            self._warn_read_only_once()
            return False
        # Several workers may share the directory: one renews, the others then find it fresh.
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            due = self._renewal_due()
            if due is None:
                return False
            ca, current = due
            cert_pem, key_pem = self._issue(ca, current)
            write_serving_pair(self.cert_dir, cert_pem, key_pem)
        log.info("renewed the serving certificate", extra={"event": "serving-cert-renewed"})
        if self.on_serving_cert_renewed is not None:
            self.on_serving_cert_renewed()
        return True

    def _open_lock(self) -> IO[str] | None:
        """The renewal lock file, or ``None`` when the cert dir cannot be written."""
        try:
            return open(self.cert_dir / ".renew.lock", "a")  # the caller closes it (with)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return None
            raise

    def _issue(self, ca: CertificateAuthority, current: bytes | None) -> tuple[str, str]:
        """A fresh serving pair for the names of ``current`` (the defaults when it has none)."""
        dns, ips = _serving_names(current)
        ttl = timedelta(seconds=self.config.ca.serving_cert_ttl_seconds)
        now = self.clock()
        if dns or ips:
            return ca.issue_serving(dns, ips, now=now, ttl=ttl)
        return ca.issue_serving(now=now, ttl=ttl)

    def _renew_in_secret(self, kube: KubeClient) -> bool:
        """Renew through Secret ``sidemesh-tls``; the kubelet then updates the mounted files.

        Due-ness is decided on the Secret, not on the mounted files: after a renewal the mount
        lags behind for up to a minute or so, and another replica may have renewed already.
        """
        from webhook.kube.client import TLS_SECRET

        ca = CertificateAuthority.load(self.cert_dir)
        mounted = self._read_mounted_cert()

        def renewed_pair(data: dict[str, bytes]) -> dict[str, bytes] | None:
            current = data.get(TLS_CERT)
            if data.get(TLS_KEY) and not serving_cert_needs_renewal(current, ca, now=self.clock()):
                return None  # fresh in the Secret already (another replica, or the kubelet lags)
            cert_pem, key_pem = self._issue(ca, current or mounted)
            return {TLS_CERT: cert_pem.encode("ascii"), TLS_KEY: key_pem.encode("ascii")}

        if not kube.update_secret(renewed_pair, TLS_SECRET):
            return False
        log.info(
            "renewed the serving certificate in Secret %s/%s; the kubelet updates %s and the "
            "server reloads it",
            names.CONTROL_PLANE_NAMESPACE,
            TLS_SECRET,
            self.cert_dir,
            extra={"event": "serving-cert-renewed"},
        )
        return True

    def _read_mounted_cert(self) -> bytes | None:
        try:
            return (self.cert_dir / TLS_CERT).read_bytes()
        except OSError:
            return None

    def _warn_read_only_once(self) -> None:
        """One warning per due period, not one per round: nothing changes between rounds."""
        from webhook.kube.client import TLS_SECRET

        if self._warned_read_only:
            return
        self._warned_read_only = True
        log.warning(
            "the serving certificate in %s is due for renewal but the directory is read-only "
            "and no Kubernetes API is configured (not in a cluster, no --kubeconfig): renew it "
            "by running `sidemesh install` again (it re-issues Secret %s/%s), or give the "
            "server a writable --cert-dir",
            self.cert_dir,
            names.CONTROL_PLANE_NAMESPACE,
            TLS_SECRET,
        )


def _serving_names(cert_pem: bytes | None) -> tuple[list[str], list[str]]:
    if not cert_pem:
        return [], []
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return [], []
    return san.get_values_for_type(x509.DNSName), [
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    ]


def upkeep_from_config(
    config: MeshConfig,
    cert_dir: Path,
    *,
    kube: KubeClient | None = None,
    kubeconfig: str | None = None,
    interval: float = 60.0,
) -> CAUpkeep | None:
    """The upkeep for ``sidemesh serve``: ``None`` when there is nothing to keep (no root key
    and no cluster). The API client is ``kube``, else from ``kubeconfig``, else in-cluster."""
    from webhook.kube.client import KubeClient, in_cluster

    if kube is None and (kubeconfig or in_cluster()):
        kube = KubeClient.connect(kubeconfig=kubeconfig)
    if kube is None and not (Path(cert_dir) / CA_KEY).exists():
        return None
    return CAUpkeep(Path(cert_dir), config=config, kube=kube, interval=interval)
