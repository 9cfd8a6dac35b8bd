"""The processes of ``sidemesh serve``: a worker, and the supervisor that runs N of them.

A worker is the whole server in one process: config, the trust bundle and serving certificate
(each followed on disk), the CA's router and upkeep, the app, on its own listening socket.
``--workers N`` turns the command's process into a small supervisor that starts N worker
processes, each with its *own* listening socket on the same port (SO_REUSEPORT), so the kernel
spreads connections over per-worker accept queues; a single shared queue (uvicorn's
``--workers``) spreads the load unevenly: whichever process wins the wake-ups takes the
connections. The supervisor forwards SIGTERM/SIGINT (each worker stops accepting and finishes
what is in flight), restarts a worker that dies (with a growing pause), and with
``--metrics-port`` serves the sum of all workers' metrics (prometheus-client's multi-process
mode, in a temporary directory it removes at the end).
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from webhook.ca.verifiers import VerifierOptions
    from webhook.config import MeshConfig

__all__ = ["ServeSettings", "Supervisor", "run_worker", "start_metrics_port"]

_RESTART_BACKOFF = (0.5, 1.0, 2.0, 5.0)


@dataclass(frozen=True)
class ServeSettings:
    """Everything a worker process needs (picklable: workers are spawned)."""

    host: str
    port: int
    cert_dir: str
    config_file: str | None
    log_level: str
    reload_interval: float
    shutdown_delay: float = 0.0
    verifier: VerifierOptions | None = None
    """Picklable (handed to worker processes); ``None`` for its environment defaults."""
    kubeconfig: str | None = None
    limits: tuple[tuple[str, float], ...] = ()
    """``limits`` keys set by flags, over the config file's."""
    workers: int = 1

    def mesh_config(self) -> MeshConfig:
        """The config file with the flags' limits, and the CA rates shared among the workers.

        Each worker keeps its own rate-limit buckets, so each enforces 1/N of the configured
        per-minute rates: an identity gets at most the configured rate in total, and less
        when its connections all land on one worker.
        """
        from webhook.config import load_config_file

        config = load_config_file(self.config_file)
        if self.limits:
            overrides: dict[str, Any] = dict(self.limits)
            limits = dataclasses.replace(config.limits, **overrides)
            config = dataclasses.replace(config, limits=limits)
        if self.workers > 1:
            ca = config.ca
            ca = dataclasses.replace(
                ca,
                rate_per_identity_per_minute=-(-ca.rate_per_identity_per_minute // self.workers),
                unauthenticated_per_address_per_minute=-(
                    -ca.unauthenticated_per_address_per_minute // self.workers
                ),
            )
            config = dataclasses.replace(config, ca=ca)
        return config


def _worker_main(settings: ServeSettings) -> None:
    """A supervised worker: it gets SIGTERM if the supervisor dies (no orphans serving on)."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the supervisor died before prctl took effect
        return
    run_worker(settings)


def run_worker(settings: ServeSettings, metrics_port: int | None = None) -> None:
    """One worker: load config, certs and CA, build the app, serve until SIGTERM/SIGINT."""
    from webhook.ca import authority as ca
    from webhook.ca.trust import ReloadingTrust
    from webhook.server.app import create_app, make_server, reuse_port_socket
    from webhook.server.logs import configure_logging
    from webhook.server.metrics import Metrics
    from webhook.server.tlsreload import ReloadingTLS

    configure_logging(settings.log_level)
    config = settings.mesh_config()
    cert_dir = Path(settings.cert_dir)
    metrics = Metrics()
    # The bundle for the pods and the CA signer follow ca.crt/ca.key like the serving cert
    # does; each worker process watches on its own.
    trust = ReloadingTrust(
        cert_dir, check_interval=settings.reload_interval, on_reload=metrics.trust_reloaded
    )
    tls = ReloadingTLS(
        cert_dir / ca.TLS_CERT,
        cert_dir / ca.TLS_KEY,
        check_interval=settings.reload_interval,
        on_load=lambda not_after, reloaded: metrics.cert_loaded(not_after, reloaded=reloaded),
        on_error=metrics.cert_reload_failed,
    )
    routers, services = _ca_parts(config, cert_dir, settings, metrics, trust)
    app = create_app(
        config=config,
        bundle=trust.bundle,
        metrics=metrics,
        tls=tls,
        routers=routers,
        services=services,
    )
    if metrics_port is not None:
        start_metrics_port(settings.host, metrics_port, metrics.registry)
    sock = reuse_port_socket(settings.host, settings.port)
    server = make_server(
        app,
        tls,
        host=settings.host,
        port=settings.port,
        shutdown_delay=settings.shutdown_delay,
        limits=config.limits,
    )
    server.run(sockets=[sock])


def _ca_parts(
    config: Any, cert_dir: Path, settings: ServeSettings, metrics: Any, trust: Any
) -> tuple[list[Any], list[Any]]:
    """The CA's router (POST /v1/certificates) and its upkeep (caBundle patching, serving cert
    renewal), each only when there is something for it to do."""
    from webhook.ca import (
        api as ca_api,  # FastAPI: imported only when serving
        upkeep as ca_upkeep,
    )

    router = ca_api.router_from_config(
        config,
        cert_dir,
        settings.verifier,
        registry=metrics.registry,
        trust=trust,
        on_unexpected=metrics.unexpected.labels("ca").inc,
    )
    upkeep = ca_upkeep.upkeep_from_config(config, cert_dir, kubeconfig=settings.kubeconfig)
    return ([router] if router is not None else []), ([upkeep] if upkeep is not None else [])


def start_metrics_port(host: str, port: int, registry: Any | None) -> None:
    """Plain-HTTP /metrics for scrapers: ``registry``, or the sum of all workers if ``None``."""
    from prometheus_client import CollectorRegistry, multiprocess as mp, start_http_server

    if registry is None:
        registry = CollectorRegistry()
        mp.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    start_http_server(port, addr=host, registry=registry)


class Supervisor:
    """``workers`` worker processes of ``settings`` (see the module doc); :meth:`run` until a
    signal stops them all."""

    def __init__(self, settings: ServeSettings, workers: int, metrics_port: int | None) -> None:
        self.settings = settings
        self.workers = workers
        self.metrics_port = metrics_port
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: dict[int, BaseProcess] = {}
        self._stopping = False
        self._restarts = 0

    def run(self) -> int:
        from webhook.server.metrics import MULTIPROC_ENV

        own_dir = None
        if not os.environ.get(MULTIPROC_ENV):
            own_dir = tempfile.mkdtemp(prefix="sidemesh-metrics-")
            os.environ[MULTIPROC_ENV] = own_dir
        signal.signal(signal.SIGTERM, self._forward)
        signal.signal(signal.SIGINT, self._forward)
        try:
            for slot in range(self.workers):
                self._spawn(slot)
            if self.metrics_port is not None:
                start_metrics_port(self.settings.host, self.metrics_port, None)
            while not self._stopping:
                time.sleep(0.2)
                self._restart_dead()
            for proc in self._procs.values():
                proc.join()
            return 0
        finally:
            if own_dir is not None:
                shutil.rmtree(own_dir, ignore_errors=True)

    def _spawn(self, slot: int) -> None:
        proc = self._ctx.Process(
            target=_worker_main, args=(self.settings,), name=f"sidemesh-worker-{slot}"
        )
        proc.start()
        self._procs[slot] = proc

    def _forward(self, signum: int, _frame: Any) -> None:
        self._stopping = True
        for proc in self._procs.values():
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signum)  # SIGTERM drains first, SIGINT stops at once

    def _restart_dead(self) -> None:
        from prometheus_client import multiprocess as mp

        from webhook.server.logs import LOGGER

        for slot, proc in list(self._procs.items()):
            if proc.is_alive() or self._stopping:
                continue
            if proc.pid is not None:
                mp.mark_process_dead(proc.pid)  # type: ignore[no-untyped-call]
            delay = _RESTART_BACKOFF[min(self._restarts, len(_RESTART_BACKOFF) - 1)]
            LOGGER.error(
                "worker exited, restarting",
                extra={"event": "supervisor", "pid": proc.pid, "code": proc.exitcode},
            )
            self._restarts += 1
            time.sleep(delay)
            if not self._stopping:
                self._spawn(slot)
