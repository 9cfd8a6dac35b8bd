"""Running the control plane: source → store → push engine → ADS server + debug endpoint."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop

from webhook import names
from webhook.dataplane.ads_bootstrap import control_plane_id
from webhook.discovery.ads import serve_ads
from webhook.discovery.core import Discovery, DiscoverySettings
from webhook.discovery.debug import DebugServer
from webhook.discovery.filesource import FileSource
from webhook.discovery.kubesource import KubeSource
from webhook.discovery.servingcert import ServingName, serving_certificate, serving_credentials
from webhook.discovery.store import ObjectStore
from webhook.kube.client import KubeClient

__all__ = [
    "XDS_CERT",
    "XDS_KEY",
    "RunSettings",
    "new_event_loop",
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


def _xds_name(trust_domain: str) -> ServingName:
    return ServingName(
        XDS_CERT, XDS_KEY, control_plane_id(trust_domain), XDS_DNS, "the xDS certificate"
    )


def xds_certificate(
    cert_dir: Path, trust_domain: str, extra_ips: tuple[str, ...] = ()
) -> tuple[bytes, bytes, bytes]:
    """``(cert, key, root)`` for the ADS server: ``xds.crt``/``xds.key`` from the directory when
    present (a mounted Secret), else issued now by the CA there (its ``ca.key``), in memory."""
    return serving_certificate(cert_dir, _xds_name(trust_domain), extra_ips)


def xds_credentials(s: RunSettings, ips: tuple[str, ...] = ()) -> Any:
    """The ADS server's TLS. A mounted pair (``xds.crt``/``xds.key``, e.g. the Secret
    ``sidemesh install`` writes) is followed: a replaced certificate or root is used from the
    next handshake on, without a restart and without closing a stream. Otherwise one is issued
    in memory from the CA in the directory, for the life of the process."""
    return serving_credentials(s.cert_dir, _xds_name(s.discovery.trust_domain), LOG, ips)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The control plane's loop: uvloop's. Every ADS message sent or ACK read is a few loop
    callbacks and a wake-up of the loop by grpcio's completion poller, per proxy per push;
    uvloop schedules them in Cython over libuv, asyncio's own loop in Python."""
    return uvloop.new_event_loop()


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
