"""Running the rate-limit service: the policy source (the control plane's), its mTLS, Redis.

The service reads RateLimitPolicy objects and Pods the way ``sidemesh discovery`` does — a
watched manifest directory, or list+watch through the API server — into an object store, and
rebuilds its :class:`~webhook.ratelimit.table.LimitTable` when they change. Its certificate
comes by the control plane's path (:mod:`webhook.discovery.servingcert`): the mounted
``ratelimit.crt``/``ratelimit.key`` (followed when replaced), else issued in memory from the CA
in the cert dir. It carries the SPIFFE id of the service account ``sidemesh-ratelimit`` in the
control-plane namespace: what every sidecar checks before it asks.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

from webhook import names
from webhook.discovery.listwatch import KINDS as KUBE_KINDS
from webhook.discovery.servingcert import ServingName, serving_credentials
from webhook.discovery.store import ObjectStore
from webhook.ratelimit.compiler import SERVICE_ACCOUNT, service_identity
from webhook.ratelimit.table import LimitTable, build_table

if TYPE_CHECKING:
    from webhook.ratelimit.service import RateLimitService

__all__ = [
    "RATELIMIT_CERT",
    "RATELIMIT_KEY",
    "SERVICE_ACCOUNT",
    "ServiceSettings",
    "TableSource",
    "run_service",
    "service_identity",
    "service_name",
]

LOG = logging.getLogger("sidemesh.ratelimit")
RATELIMIT_CERT: Final = "ratelimit.crt"
RATELIMIT_KEY: Final = "ratelimit.key"
#: What the service reads: the policies, and the Pods that say who may spend them.
READS: Final = ("Pod", "RateLimitPolicy")


def service_name(trust_domain: str) -> ServingName:
    dns = (*names.control_plane_dns_names(SERVICE_ACCOUNT), "localhost")
    return ServingName(
        RATELIMIT_CERT,
        RATELIMIT_KEY,
        service_identity(trust_domain),
        dns,
        "the rate-limit service's certificate",
    )


@dataclass(frozen=True)
class ServiceSettings:
    listen: str
    cert_dir: Path
    trust_domain: str
    mesh_dir: Path | None = None
    kubernetes: bool = False
    kubeconfig: str | None = None
    poll_interval: float = 1.0


class _Source(Protocol):
    def stop(self) -> None: ...


class TableSource:
    """The limit table of what ``store`` holds now, rebuilt on the first read after a change
    (the store's sources write from their own threads)."""

    def __init__(self, store: ObjectStore, trust_domain: str) -> None:
        self._store = store
        self._trust_domain = trust_domain
        self._lock = threading.Lock()
        self._version = 0
        self._built = -1
        self._table = LimitTable({}, {})
        store.subscribe(self._changed)

    def _changed(self, keys: object) -> None:
        with self._lock:
            self._version += 1

    def __call__(self) -> LimitTable:
        with self._lock:
            version = self._version
        if version != self._built:
            table = build_table(
                self._store.list("RateLimitPolicy"), self._store.list("Pod"), self._trust_domain
            )
            for where, why in sorted(set(table.errors.items()) - set(self._table.errors.items())):
                LOG.error("RateLimitPolicy %s not enforced: %s", where, why)
            self._table, self._built = table, version
        return self._table


async def _source(s: ServiceSettings, store: ObjectStore, stop: asyncio.Event) -> _Source:
    """Start filling ``store``; returns the source (``.stop()``) once the first list is in."""
    if s.kubernetes:
        from webhook.discovery.kubesource import KubeSource
        from webhook.kube.client import KubeClient

        kinds = tuple(k for k in KUBE_KINDS if k.kind in READS)
        source = KubeSource(KubeClient.connect(kubeconfig=s.kubeconfig), store, kinds=kinds)
        source.start()
        # Answer nothing before every policy is known: an unknown limit is not counted.
        while not await source.wait_synced(timeout=1.0):
            if stop.is_set():
                break
        return source
    from webhook.discovery.filesource import FileSource

    files = FileSource(store, s.mesh_dir, s.poll_interval)
    files.load()
    files.start()
    return files


async def run_service(
    s: ServiceSettings,
    make_service: Callable[[Callable[[], LimitTable]], RateLimitService],
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``). ``make_service(table)`` builds the servicer
    (the caller owns Redis and the metrics)."""
    from webhook.ratelimit.service import serve

    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    store = ObjectStore()
    table = TableSource(store, s.trust_domain)
    source = await _source(s, store, stop)
    try:
        if stop.is_set():
            return
        limits = table()
        credentials = serving_credentials(s.cert_dir, service_name(s.trust_domain), LOG)
        server = await serve(make_service(table), s.listen, credentials)
        LOG.info(
            "rate-limit service on %s (mTLS as %s), %d Global limits from %s",
            s.listen,
            service_identity(s.trust_domain),
            len(limits.limits),
            "the API server" if s.kubernetes else s.mesh_dir or "the embedded default",
        )
        await stop.wait()
        await server.stop(grace=1.0)
    finally:
        source.stop()
