"""The TLS of a control-plane gRPC server the sidecars call (xDS, the rate-limit service).

Both serve with a certificate from the mesh CA carrying the SPIFFE id of their own service
account, and require a client certificate that chains to the mesh root. Where it comes from:

- a mounted pair (``<name>.crt``/``<name>.key`` next to ``ca.crt``, e.g. a Secret written by
  ``sidemesh install``) is followed: a replaced certificate or root is used from the next
  handshake on, without a restart and without closing a stream;
- otherwise one is issued in memory from the CA in the directory (``ca.key``), for the life of
  the process (local runs and tests).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from webhook.ca import authority as ca
from webhook.errors import ConfigError
from webhook.files import Reloading

__all__ = [
    "ServingName",
    "mounted_pair",
    "peer_spiffe_id",
    "reloading_credentials",
    "server_credentials",
    "serving_certificate",
    "serving_credentials",
]


@dataclass(frozen=True)
class ServingName:
    """Who a server is: its file names in the cert dir, its SPIFFE id, its DNS names."""

    cert_file: str
    key_file: str
    spiffe_id: str
    dns: tuple[str, ...]
    #: For log lines: "the xDS certificate".
    what: str


def serving_certificate(
    cert_dir: Path, name: ServingName, extra_ips: tuple[str, ...] = ()
) -> tuple[bytes, bytes, bytes]:
    """``(cert, key, root)``: the mounted pair when present, else issued now by the CA in
    ``cert_dir`` (its ``ca.key``), in memory."""
    root = cert_dir / ca.CA_CERT
    if not root.exists():
        raise ConfigError(f"{root} is missing: the server trusts proxies of this root")
    cert, key = cert_dir / name.cert_file, cert_dir / name.key_file
    if cert.exists() and key.exists():
        return cert.read_bytes(), key.read_bytes(), root.read_bytes()
    if not (cert_dir / ca.CA_KEY).exists():
        raise ConfigError(f"neither {cert} nor {cert_dir / ca.CA_KEY} to issue it from")
    authority = ca.CertificateAuthority.load(cert_dir)
    pem, key_pem = authority.issue_serving(
        name.dns,
        ("127.0.0.1", "::1", *extra_ips),
        now=datetime.now(UTC),
        ttl=timedelta(days=30),
        uris=(name.spiffe_id,),
    )
    return pem.encode(), key_pem.encode(), root.read_bytes()


_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def mounted_pair(cert_dir: Path, name: ServingName) -> tuple[bytes, bytes, bytes]:
    """The mounted certificate, key and ``ca.crt`` as they are now; ValueError when the key is
    not the certificate's (a writer half-way through replacing the pair)."""
    cert = (cert_dir / name.cert_file).read_bytes()
    key = (cert_dir / name.key_file).read_bytes()
    root = (cert_dir / ca.CA_CERT).read_bytes()
    public = x509.load_pem_x509_certificate(cert).public_key().public_bytes(*_SPKI)
    private = serialization.load_pem_private_key(key, password=None)
    if private.public_key().public_bytes(*_SPKI) != public:
        raise ValueError(
            f"{cert_dir / name.key_file} is not the key of {cert_dir / name.cert_file}"
        )
    return cert, key, root


def server_credentials(cert_pem: bytes, key_pem: bytes, root_pem: bytes) -> Any:
    """TLS with a client certificate from the mesh CA required."""
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=root_pem, require_client_auth=True
    )


def reloading_credentials(current: Callable[[], tuple[bytes, bytes, bytes] | None]) -> Any:
    """Like :func:`server_credentials`, for a certificate that is replaced while we serve.

    gRPC asks ``current`` at each new TLS handshake: ``None`` keeps what it has, a new
    ``(cert, key, root)`` is used from this handshake on. Streams already open keep theirs, so
    a rotated certificate (or root) costs no sidecar its connection."""
    first = current()
    if first is None:
        raise ValueError("no serving certificate to start with")

    def config(pems: tuple[bytes, bytes, bytes]) -> Any:
        cert, key, root = pems
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=root)

    def fetch() -> Any:
        pems = current()
        return None if pems is None else config(pems)

    return grpc.dynamic_ssl_server_credentials(
        config(first), fetch, require_client_authentication=True
    )


def serving_credentials(
    cert_dir: Path, name: ServingName, log: logging.Logger, ips: tuple[str, ...] = ()
) -> Any:
    """The server's TLS: a mounted pair followed (hot reload), else issued in memory."""
    if not ((cert_dir / name.cert_file).exists() and (cert_dir / name.key_file).exists()):
        return server_credentials(*serving_certificate(cert_dir, name, ips))
    paths = (cert_dir / name.cert_file, cert_dir / name.key_file, cert_dir / ca.CA_CERT)
    watched = Reloading(
        paths,
        lambda: mounted_pair(cert_dir, name),
        refuse=(ValueError, OSError),
        retry_refused=True,
        on_reload=lambda _: log.info("%s changed; serving the new one", name.what),
        on_refused=lambda exc: log.warning("keeping %s: %s", name.what, exc),
    )
    handed = {"reloads": -1}

    def current() -> tuple[bytes, bytes, bytes] | None:
        watched.poll()
        if watched.reloads == handed["reloads"]:
            return None
        handed["reloads"] = watched.reloads
        return watched.value

    return reloading_credentials(current)


def peer_spiffe_id(context: Any) -> str | None:
    """The URI SAN of the verified client certificate of this call, if any."""
    auth = context.auth_context()
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        return None
    try:
        cert = x509.load_pem_x509_certificate(pems[0])
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    uris = [
        u
        for u in sans.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith("spiffe://")
    ]
    return uris[0] if len(uris) == 1 else None
