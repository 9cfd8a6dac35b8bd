"""Which root and serving certificate the install ships, and the Secrets that carry them.

The mesh root is reused wherever it already exists — the cluster's Secret ``sidemesh-ca``
first (re-installing or upgrading must never swap the root under running workloads), else
``ca.crt``/``ca.key`` in the cert dir — and created in the cert dir (key mode 0600) only when
neither exists. The webhook's serving certificate is reused from the cluster's Secret
``sidemesh-tls`` while it is from this root, names the Service and is not in its last third of
life; otherwise a fresh one is issued. Keys travel only through ``kubectl``'s stdin: never into
the repository, never to the terminal (``--dry-run`` shows them as :data:`REDACTED`).
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from webhook import names
from webhook.ca.authority import (
    CA_CERT,
    CA_KEY,
    SERVICE_DNS_NAMES,
    TLS_CERT,
    TLS_KEY,
    CertificateAuthority,
    fingerprint_sha256,
)
from webhook.ca.serving import serving_cert_needs_renewal
from webhook.errors import PKIError
from webhook.install.runner import InstallError
from webhook.kube.client import TLS_SECRET
from webhook.ratelimit.compiler import (
    SERVICE_ACCOUNT as RATELIMIT_SERVICE_ACCOUNT,
    service_identity,
)

__all__ = [
    "CA_SECRET",
    "DISCOVERY_DNS_NAMES",
    "DISCOVERY_TLS_SECRET",
    "LABELS",
    "RATELIMIT_TLS_SECRET",
    "REDACTED",
    "TLS_SECRET",
    "Pki",
    "plan_pki",
    "redact",
    "secrets",
]

CA_SECRET = "sidemesh-ca"
#: The xDS server's certificate and key (``tls.crt``/``tls.key``), mounted as xds.crt/xds.key.
DISCOVERY_TLS_SECRET = f"{names.DISCOVERY_NAME}-tls"
#: The rate-limit service's certificate and key, mounted as ratelimit.crt/ratelimit.key (its
#: optional component mounts it; the certificate names its Service and service account).
RATELIMIT_TLS_SECRET = f"{RATELIMIT_SERVICE_ACCOUNT}-tls"
NAMESPACE = names.CONTROL_PLANE_NAMESPACE
FIELD_MANAGER = "sidemesh-install"
#: Replaces private keys in ``--dry-run`` output. Not base64, so the output cannot be applied.
REDACTED = "<redacted>"
_PRIVATE_KEYS = (CA_KEY, TLS_KEY)
LABELS = {
    "app.kubernetes.io/part-of": "sidemesh",
    "app.kubernetes.io/managed-by": FIELD_MANAGER,
}

#: The names sidecars may use to reach the discovery Service.
DISCOVERY_DNS_NAMES = names.control_plane_dns_names(names.DISCOVERY_NAME)


@dataclass(frozen=True)
class Pki:
    """The certificates and keys to install, and where each came from (said to the user)."""

    ca: CertificateAuthority
    root_key_pem: str | None  # None only for a dry run's throwaway root
    serving_cert_pem: str
    serving_key_pem: str
    xds_cert_pem: str = ""
    xds_key_pem: str = ""
    ratelimit_cert_pem: str = ""
    ratelimit_key_pem: str = ""
    notes: tuple[str, ...] = field(default=())


def plan_pki(
    *,
    cert_dir: Path,
    cluster: Mapping[str, Mapping[str, bytes]],
    now: datetime,
    serving_ttl: timedelta,
    dry_run: bool,
    trust_domain: str,
) -> Pki:
    """Decide which root and serving certificate to install (the module docstring says how).

    ``cluster`` maps Secret names to their decoded data, as found in the cluster (empty for a
    first install or a dry run). Writes to ``cert_dir`` only when it creates a root, and never
    in a dry run.
    """
    notes: list[str] = []
    ca, root_key_pem = _plan_root(cert_dir, cluster.get(CA_SECRET) or {}, now, dry_run, notes)
    cert_pem, key_pem = _plan_serving(
        ca,
        cluster.get(TLS_SECRET) or {},
        TLS_SECRET,
        SERVICE_DNS_NAMES,
        (),
        now,
        serving_ttl,
        notes,
    )
    xds_id = names.spiffe_id(trust_domain, names.CONTROL_PLANE_NAMESPACE, names.DISCOVERY_NAME)
    xds_cert, xds_key = _plan_serving(
        ca,
        cluster.get(DISCOVERY_TLS_SECRET) or {},
        DISCOVERY_TLS_SECRET,
        DISCOVERY_DNS_NAMES,
        (xds_id,),
        now,
        serving_ttl,
        notes,
    )
    rls_cert, rls_key = _plan_serving(
        ca,
        cluster.get(RATELIMIT_TLS_SECRET) or {},
        RATELIMIT_TLS_SECRET,
        names.control_plane_dns_names(RATELIMIT_SERVICE_ACCOUNT),
        (service_identity(trust_domain),),
        now,
        serving_ttl,
        notes,
    )
    return Pki(
        ca, root_key_pem, cert_pem, key_pem, xds_cert, xds_key, rls_cert, rls_key, tuple(notes)
    )


def _plan_root(
    cert_dir: Path,
    in_cluster: Mapping[str, bytes],
    now: datetime,
    dry_run: bool,
    notes: list[str],
) -> tuple[CertificateAuthority, str | None]:
    """The cluster's root, else the cert dir's, else a new one (saved unless a dry run)."""
    local_exists = (cert_dir / CA_CERT).exists() or (cert_dir / CA_KEY).exists()
    root_key_pem: str | None
    if in_cluster:
        ca = _ca_from_secret(in_cluster)
        root_key_pem = in_cluster[CA_KEY].decode()
        fp = fingerprint_sha256(ca.cert)
        if local_exists:
            local = CertificateAuthority.load(cert_dir)
            if local.cert != ca.cert:
                raise InstallError(
                    f"the cluster's mesh root (Secret {NAMESPACE}/{CA_SECRET}, SHA-256 {fp}) "
                    f"differs from the one in {cert_dir} "
                    f"(SHA-256 {fingerprint_sha256(local.cert)}). Installing would replace the "
                    "root and break mTLS between every injected pod and its peers; nothing was "
                    f"changed. Keep the cluster's root (move {cert_dir}/{CA_CERT} and {CA_KEY} "
                    "away, or point --cert-dir elsewhere), or run `sidemesh uninstall` first."
                )
        notes.append(f"root: reusing the cluster's (Secret {NAMESPACE}/{CA_SECRET}, {fp})")
    elif local_exists:
        ca = CertificateAuthority.load(cert_dir)
        root_key_pem = (cert_dir / CA_KEY).read_text(encoding="ascii")
        notes.append(f"root: reusing {cert_dir}/{CA_CERT} ({fingerprint_sha256(ca.cert)})")
    else:
        ca = CertificateAuthority.create(now=now)
        if dry_run:
            root_key_pem = None
            notes.append(
                f"root: none in {cert_dir}; a real install would create one there "
                "(this dry run uses a throwaway root)"
            )
        else:
            ca.save(cert_dir)
            root_key_pem = (cert_dir / CA_KEY).read_text(encoding="ascii")
            notes.append(
                f"root: created {cert_dir}/{CA_CERT} and {CA_KEY} (mode 0600; keep the key "
                f"safe, it signs every workload identity) — {fingerprint_sha256(ca.cert)}"
            )

    return ca, root_key_pem


def _plan_serving(
    ca: CertificateAuthority,
    current: Mapping[str, bytes],
    secret: str,
    dns: tuple[str, ...],
    uris: tuple[str, ...],
    now: datetime,
    ttl: timedelta,
    notes: list[str],
) -> tuple[str, str]:
    """The serving pair in ``secret`` while it is good (from this root, names ``dns`` and
    ``uris``, not in its last third), else a fresh one."""
    cert = current.get(TLS_CERT)
    if (
        cert
        and current.get(TLS_KEY)
        and not serving_cert_needs_renewal(cert, ca, now=now)
        and _names(cert, dns, uris)
    ):
        notes.append(f"{secret}: reusing the certificate in Secret {NAMESPACE}/{secret}")
        return cert.decode(), current[TLS_KEY].decode()
    cert_pem, key_pem = ca.issue_serving(dns, (), now=now, ttl=ttl, uris=uris)
    expires = x509.load_pem_x509_certificate(cert_pem.encode()).not_valid_after_utc
    notes.append(
        f"{secret}: issued for {dns[2]}, valid until {expires:%Y-%m-%d} "
        f"(run `sidemesh install` again before then; it renews in the last third)"
    )
    return cert_pem, key_pem


def _ca_from_secret(data: Mapping[str, bytes]) -> CertificateAuthority:
    where = f"Secret {NAMESPACE}/{CA_SECRET}"
    if CA_CERT not in data or CA_KEY not in data:
        raise PKIError(f"{where} lacks {CA_CERT} or {CA_KEY}; fix or delete it before installing")
    return CertificateAuthority.from_pem(data[CA_CERT], data[CA_KEY], where=where)


def _names(cert_pem: bytes, dns: tuple[str, ...], uris: tuple[str, ...]) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return False
    return set(dns) <= set(san.get_values_for_type(x509.DNSName)) and set(uris) <= set(
        san.get_values_for_type(x509.UniformResourceIdentifier)
    )


def secrets(pki: Pki) -> list[dict[str, Any]]:
    """The Secrets the Deployments mount (the xDS one when ``pki`` has its certificate).
    A dry run's throwaway root key shows redacted."""

    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    def secret(name: str, kind: str, data: dict[str, str]) -> dict[str, Any]:
        meta = {"name": name, "namespace": NAMESPACE, "labels": dict(LABELS)}
        return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": kind, "data": data}

    root_key = b64(pki.root_key_pem) if pki.root_key_pem is not None else REDACTED
    return [
        secret(CA_SECRET, "Opaque", {CA_CERT: b64(pki.ca.root_pem), CA_KEY: root_key}),
        secret(
            TLS_SECRET,
            "kubernetes.io/tls",
            {TLS_CERT: b64(pki.serving_cert_pem), TLS_KEY: b64(pki.serving_key_pem)},
        ),
        *(
            [
                secret(
                    DISCOVERY_TLS_SECRET,
                    "kubernetes.io/tls",
                    {TLS_CERT: b64(pki.xds_cert_pem), TLS_KEY: b64(pki.xds_key_pem)},
                )
            ]
            if pki.xds_cert_pem
            else []
        ),
        *(
            [
                secret(
                    RATELIMIT_TLS_SECRET,
                    "kubernetes.io/tls",
                    {TLS_CERT: b64(pki.ratelimit_cert_pem), TLS_KEY: b64(pki.ratelimit_key_pem)},
                )
            ]
            if pki.ratelimit_cert_pem
            else []
        ),
    ]


def redact(objects: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``objects`` with every private key in a Secret replaced by :data:`REDACTED`.

    Certificates stay: they are public, and a reader of a dry run may want to inspect them."""
    out = []
    for obj in objects:
        obj = copy.deepcopy(obj)
        if obj.get("kind") == "Secret":
            data = obj.get("data") or {}
            for key in data:
                if key in _PRIVATE_KEYS or key.endswith(".key"):
                    data[key] = REDACTED
        out.append(obj)
    return out
