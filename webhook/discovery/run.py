"""Running the control plane: source → store → push engine → ADS server + debug endpoint."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from webhook import names
from webhook.ca import authority as ca
from webhook.dataplane.ads_bootstrap import control_plane_id
from webhook.discovery.ads import serve_ads, server_credentials
from webhook.discovery.core import Discovery, DiscoverySettings
from webhook.discovery.debug import DebugServer
from webhook.discovery.filesource import FileSource
from webhook.discovery.kubesource import KubeSource
from webhook.discovery.store import ObjectStore
from webhook.errors import ConfigError
from webhook.kube.client import KubeClient

__all__ = ["XDS_CERT", "XDS_KEY", "RunSettings", "run_discovery", "xds_certificate"]

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
    cert, key, root = xds_certificate(s.cert_dir, s.discovery.trust_domain, ips)
    server = await serve_ads(discovery, s.listen, server_credentials(cert, key, root))
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
