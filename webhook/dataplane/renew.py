"""Getting and keeping the workload certificate: one attempt, the backoff between attempts,
and what the agent reports about it.

One attempt = a fresh key, the pod's token and bundle read from their files, one bounded CA
call (:mod:`webhook.dataplane.cacall`), the answer checked (:func:`identity.check_issued`)
and, only then, installed. Any failure is a :class:`CARequestError`: the caller waits
:meth:`Backoff.delay` and tries again, so a CA that fails every time costs one attempt per
backoff step, never a loop.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from webhook.dataplane.cacall import request_certificate
from webhook.dataplane.identity import (
    CARequestError,
    Issued,
    build_csr,
    check_issued,
    install_generation,
    load_bundle,
    new_key,
)

__all__ = ["AgentStatus", "Backoff", "CertificateSource"]

LOG = logging.getLogger("sidemesh.proxy")


@dataclass
class Backoff:
    """Capped exponential backoff with jitter: the n-th consecutive failure waits
    ``min(cap, base * 2**n)`` times a random factor in [0.5, 1) — never less than half the
    step, so attempts stay bounded; the jitter keeps a fleet of pods from retrying in step."""

    base: float = 0.5
    cap: float = 30.0
    rand: Callable[[], float] = random.random
    failures: int = 0

    def delay(self) -> float:
        step = min(self.cap, self.base * float(2 ** min(self.failures, 32)))
        self.failures += 1
        return float(step * (0.5 + 0.5 * self.rand()))

    def reset(self) -> None:
        self.failures = 0


@dataclass
class AgentStatus:
    """What the agent says about its certificate on the probe port's ``/metrics``."""

    requests_ok: int = 0
    requests_failed: int = 0
    not_after: datetime | None = None
    expired: bool = False
    last_error: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def prometheus(self) -> str:
        with self.lock:
            expiry = self.not_after.timestamp() if self.not_after else 0
            return (
                "# HELP sidemesh_agent_ca_requests_total Certificate requests by result.\n"
                "# TYPE sidemesh_agent_ca_requests_total counter\n"
                f'sidemesh_agent_ca_requests_total{{result="ok"}} {self.requests_ok}\n'
                f'sidemesh_agent_ca_requests_total{{result="error"}} {self.requests_failed}\n'
                "# HELP sidemesh_agent_certificate_expiry_timestamp_seconds notAfter of the "
                "installed workload certificate.\n"
                "# TYPE sidemesh_agent_certificate_expiry_timestamp_seconds gauge\n"
                f"sidemesh_agent_certificate_expiry_timestamp_seconds {expiry:.0f}\n"
                "# HELP sidemesh_agent_certificate_expired 1 while the installed certificate "
                "has expired and no new one could be obtained (the proxy is not ready).\n"
                "# TYPE sidemesh_agent_certificate_expired gauge\n"
                f"sidemesh_agent_certificate_expired {int(self.expired)}\n"
            )


@dataclass(frozen=True)
class CertificateSource:
    """Where certificates come from and where they go (plain values from the settings)."""

    ca_address: str
    token_file: Path
    bundle_file: Path
    cert_dir: Path
    spiffe_id: str
    ttl_seconds: int | None = None
    owner: tuple[int, int] | None = None
    request_timeout: float = 10.0

    def attempt(
        self, now: Callable[[], datetime], cancel: threading.Event, status: AgentStatus
    ) -> Issued:
        """One attempt; the new certificate is installed when this returns."""
        try:
            issued = self._attempt(now, cancel)
        except CARequestError as exc:
            with status.lock:
                status.requests_failed += 1
                status.last_error = str(exc)
            raise
        with status.lock:
            status.requests_ok += 1
            status.not_after = issued.not_after
        return issued

    def _attempt(self, now: Callable[[], datetime], cancel: threading.Event) -> Issued:
        bundle = load_bundle(self.bundle_file)
        try:
            token = self.token_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CARequestError(f"cannot read the token {self.token_file}: {exc}") from None
        key = new_key()
        answer = request_certificate(
            self.ca_address,
            csr_pem=build_csr(key, self.spiffe_id),
            token=token,
            bundle_pem=bundle,
            ttl_seconds=self.ttl_seconds,
            timeout=self.request_timeout,
            cancel=cancel,
        )
        if answer.trust_bundle_pem is not None and not _same_roots(answer.trust_bundle_pem, bundle):
            LOG.warning(
                "the CA answered a trustBundle that differs from this pod's bundle (%s): "
                "ignored, the mesh root comes only from the pod spec",
                self.bundle_file,
            )
        issued = check_issued(key, answer.chain_pem, bundle, self.spiffe_id, now=now())
        install_generation(self.cert_dir, key, issued, owner=self.owner)
        return issued


def _same_roots(theirs: str, ours: str) -> bool:
    def ders(pem: str) -> set[bytes]:
        certs = x509.load_pem_x509_certificates(pem.encode())
        return {c.public_bytes(serialization.Encoding.DER) for c in certs}

    try:
        return ders(theirs) == ders(ours)
    except ValueError:
        return False
