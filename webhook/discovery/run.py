"""Running the control plane: source → store → push engine → ADS server + debug endpoint."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from webhook import names
from webhook.ca import authority as ca
from webhook.dataplane.ads_bootstrap import control_plane_id
from webhook.discovery.ads import reloading_credentials, serve_ads, server_credentials
from webhook.discovery.core import Discovery, DiscoverySettings
from webhook.discovery.debug import DebugServer
from webhook.discovery.filesource import FileSource
from webhook.discovery.kubesource import KubeSource
from webhook.discovery.store import ObjectStore
from webhook.errors import ConfigError
from webhook.files import Reloading
from webhook.kube.client import KubeClient

__all__ = [
    "XDS_CERT",
    "XDS_KEY",
    "RunSettings",
    "run_discovery",
    "xds_certificate",
    "xds_credentials",
]

LOG = logging.getLogger("sidemesh.discovery")
XDS_CERT = "xds.crt"
XDS_KEY = "xds.key"
#: Names the xDS certificate carries besides the SPIFFE id (the Service, and local runs).
XDS_DNS = (
    f"{names.DISCOVERY_NAME}.{names.CONTROL_PLANE_NAMESPACE}.svc",
    f"{names.DISCOVERY_NAME}.{names.CONTROL_PLANE_NAMESPACE}.svc.cluster.local",
    "localhost",
)


@dataclass(frozen=True)
class RunSettings:
    listen: str
    debug_host: str
    debug_port: int
    cert_dir: Path
    mesh_dir: Path | None
    poll_interval: float
    discovery: DiscoverySettings
    kubernetes: bool = False
    """Read the cluster through the API server (in a pod its service account, else
    ``kubeconfig`` or kubectl's default) instead of ``mesh_dir``."""
    kubeconfig: str | None = None
    #: With ``kubernetes``: write each traffic rule's status (Accepted, ResolvedRefs).
    write_status: bool = True


def xds_certificate(
    cert_dir: Path, trust_domain: str, extra_ips: tuple[str, ...] = ()
) -> tuple[bytes, bytes, bytes]:
    """``(cert, key, root)`` for the ADS server: ``xds.crt``/``xds.key`` from the directory when
    present (a mounted Secret), else issued now by the CA there (its ``ca.key``), in memory."""
    root = cert_dir / ca.CA_CERT
    if not root.exists():
        raise ConfigError(f"{root} is missing: the xDS server trusts proxies of this root")
    cert, key = cert_dir / XDS_CERT, cert_dir / XDS_KEY
    if cert.exists() and key.exists():
        return cert.read_bytes(), key.read_bytes(), root.read_bytes()
    if not (cert_dir / ca.CA_KEY).exists():
        raise ConfigError(f"neither {cert} nor {cert_dir / ca.CA_KEY} to issue it from")
    authority = ca.CertificateAuthority.load(cert_dir)
    pem, key_pem = authority.issue_serving(
        XDS_DNS,
        ("127.0.0.1", "::1", *extra_ips),
        now=datetime.now(UTC),
        ttl=timedelta(days=30),
        uris=(control_plane_id(trust_domain),),
    )
    return pem.encode(), key_pem.encode(), root.read_bytes()


def _mounted_pair(cert_dir: Path) -> tuple[bytes, bytes, bytes]:
    """``xds.crt``, ``xds.key`` and ``ca.crt`` as they are now; ValueError when the key is not
    the certificate's (a writer half-way through replacing the pair)."""
    cert = (cert_dir / XDS_CERT).read_bytes()
    key = (cert_dir / XDS_KEY).read_bytes()
    root = (cert_dir / ca.CA_CERT).read_bytes()
    public = x509.load_pem_x509_certificate(cert).public_key().public_bytes(*_SPKI)
    private = serialization.load_pem_private_key(key, password=None)
    if private.public_key().public_bytes(*_SPKI) != public:
        raise ValueError(f"{cert_dir / XDS_KEY} is not the key of {cert_dir / XDS_CERT}")
    return cert, key, root


_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def xds_credentials(s: RunSettings, ips: tuple[str, ...] = ()) -> Any:
    """The ADS server's TLS. A mounted pair (``xds.crt``/``xds.key``, e.g. the Secret
    ``sidemesh install`` writes) is followed: a replaced certificate or root is used from the
    next handshake on, without a restart and without closing a stream. Otherwise one is issued
    in memory from the CA in the directory, for the life of the process."""
    if not ((s.cert_dir / XDS_CERT).exists() and (s.cert_dir / XDS_KEY).exists()):
        return server_credentials(*xds_certificate(s.cert_dir, s.discovery.trust_domain, ips))
    paths = (s.cert_dir / XDS_CERT, s.cert_dir / XDS_KEY, s.cert_dir / ca.CA_CERT)
    watched = Reloading(
        paths,
        lambda: _mounted_pair(s.cert_dir),
        refuse=(ValueError, OSError),
        retry_refused=True,
        on_reload=lambda _: LOG.info("discovery: the xDS certificate changed; serving the new one"),
        on_refused=lambda exc: LOG.warning("discovery: keeping the xDS certificate: %s", exc),
    )
    handed = {"reloads": -1}

    def current() -> tuple[bytes, bytes, bytes] | None:
        watched.poll()
        if watched.reloads == handed["reloads"]:
            return None
        handed["reloads"] = watched.reloads
        return watched.value

    return reloading_credentials(current)


async def run_discovery(s: RunSettings, stop: asyncio.Event | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    store = ObjectStore()
    source: FileSource | KubeSource
    kube: KubeClient | None = None
    if s.kubernetes:
        kube = KubeClient.connect(kubeconfig=s.kubeconfig)
        source = KubeSource(kube, store)
        source.start()  # threads: watch from now on, so nothing is missed before xDS starts
        LOG.info("discovery: listing Namespaces, Services, EndpointSlices and Pods …")
        # Serve nothing before the whole cluster is known: a half-listed store would push
        # sidecars a mesh with Services missing, and they would drop those clusters.
        while not await source.wait_synced(timeout=1.0):
            if stop.is_set():
                source.stop()
                return
    else:
        source = FileSource(store, s.mesh_dir, s.poll_interval)
        source.load()
    discovery = Discovery(store, s.discovery)
    discovery.start(loop)
    listen_host = s.listen.rpartition(":")[0].strip("[]")
    ips = (listen_host,) if listen_host not in ("0.0.0.0", "::", "", "127.0.0.1") else ()
    server = await serve_ads(discovery, s.listen, xds_credentials(s, ips))
    debug = DebugServer(discovery, loop, s.debug_host, s.debug_port)
    debug.start()
    if isinstance(source, FileSource):
        source.start()
    counts = {k: len(store.list(k)) for k in ("Service", "EndpointSlice", "Pod")}
    LOG.info(
        "discovery: xDS on %s (mTLS), debug on http://%s:%d, mesh from %s: %s",
        s.listen,
        s.debug_host,
        debug.port,
        "the API server" if s.kubernetes else s.mesh_dir or "the embedded default",
        counts,
    )
    status_task = None
    if kube is not None and s.write_status:
        from webhook.routing.statuswriter import StatusWriter

        status_task = asyncio.create_task(StatusWriter(kube, discovery).run())
    try:
        await stop.wait()
    finally:
        if status_task is not None:
            status_task.cancel()
        source.stop()
        debug.stop()
        await server.stop(grace=2)
