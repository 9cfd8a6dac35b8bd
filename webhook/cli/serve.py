"""`sidemesh serve`: the admission webhook (and the mini-CA) over HTTPS.

One worker runs in this process. ``--workers N`` turns this process into a small supervisor
that starts N worker processes, each with its *own* listening socket on the same port
(SO_REUSEPORT), so the kernel spreads connections over per-worker accept queues; a single
shared queue (uvicorn's ``--workers``) spreads the load unevenly: whichever process wins the
wake-ups takes the connections.
The supervisor forwards SIGTERM/SIGINT (each worker stops accepting and finishes what is in
flight), restarts a worker that dies, and with ``--metrics-port`` serves the sum of all
workers' metrics (prometheus-client's multi-process mode).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from webhook.ca.api import VerifierOptions
    from webhook.config import MeshConfig

__all__ = ["ServeSettings", "curl_example", "register", "run_worker"]

SAMPLE_REVIEW = "webhook/samples/review.json"
_RESTART_BACKOFF = (0.5, 1.0, 2.0, 5.0)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the admission webhook (POST /mutate) and the CA over HTTPS",
        description="Serve POST /mutate, /healthz, /readyz, /metrics (and POST "
        "/v1/certificates when the cert dir holds ca.key) over HTTPS, TLS 1.2 minimum.",
    )
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=8443, help="HTTPS port (default 8443)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--config", default=None, help="mesh config file (YAML); default: built-ins")
    p.add_argument(
        "--cert-dir",
        default="certs",
        help="ca.crt + tls.crt + tls.key (a development PKI is created here when missing); "
        "the serving cert is reloaded when these files change",
    )
    p.add_argument(
        "--metrics-port", type=int, default=None, help="also serve /metrics as plain HTTP here"
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--reload-interval",
        type=float,
        default=1.0,
        help="seconds between checks of the cert files (tls.*, and ca.crt/ca.key for the "
        "injected trust bundle and the CA signer) for changes (default 1)",
    )
    ca = p.add_argument_group(
        "certificate authority",
        "POST /v1/certificates is served when the cert dir holds ca.key and a token verifier "
        "is configured (flags below, their SIDEMESH_* environment variables, or in-cluster "
        "TokenReview); see docs/CONTRACTS.md section 3",
    )
    ca.add_argument("--jwks-file", default=None, help="issuer public keys (JWKS JSON)")
    ca.add_argument("--jwks-url", default=None, help="issuer public keys over HTTPS")
    ca.add_argument("--jwks-issuer", default=None, help="the tokens' iss (with a JWKS source)")
    ca.add_argument("--jwks-ca-file", default=None, help="CA that verifies --jwks-url")
    ca.add_argument("--token-review", action="store_true", help="authenticate by TokenReview")
    ca.add_argument("--kubeconfig", default=None, help="API access outside a cluster")
    p.add_argument(
        "--shutdown-delay",
        type=float,
        default=5.0,
        help="on SIGTERM, keep serving (and fail /readyz) this many seconds before the "
        "graceful stop, while the pod leaves the Service's endpoints (default 5; Ctrl-C skips)",
    )
    limits = p.add_argument_group(
        "client limits",
        "override the mesh config's limits section (docs/webhook.md, section Client limits)",
    )
    for flag, (key, kind) in LIMIT_FLAGS.items():
        limits.add_argument(flag, type=kind, default=None, help=f"limits.{key}")
    p.set_defaults(handler=_serve)


#: ``sidemesh serve`` flags that override keys of the mesh config's ``limits`` section.
LIMIT_FLAGS: dict[str, tuple[str, type]] = {
    "--max-connections": ("max_connections", int),
    "--max-header-bytes": ("max_header_bytes", int),
    "--max-headers": ("max_headers", int),
    "--header-timeout": ("header_timeout_seconds", float),
    "--body-timeout": ("body_timeout_seconds", float),
    "--idle-timeout": ("idle_timeout_seconds", float),
}


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


def curl_example(host: str, port: int, cert_dir: str) -> str:
    target = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    if ":" in target:
        target = f"[{target}]"
    return (
        f"curl --cacert {cert_dir}/ca.crt -H 'Content-Type: application/json' "
        f"--data @{SAMPLE_REVIEW} https://{target}:{port}/mutate"
    )


def _serve(args: argparse.Namespace) -> int:
    from webhook.config import load_config_file
    from webhook.errors import ConfigError
    from webhook.server.logs import LOGGER, configure_logging

    configure_logging(args.log_level)
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    load_config_file(args.config)  # fail here, once, with the key and the value
    cert_dir = Path(args.cert_dir)
    _ensure_pki(cert_dir)
    settings = ServeSettings(
        host=args.host,
        port=args.port,
        cert_dir=str(cert_dir),
        config_file=args.config,
        log_level=args.log_level,
        reload_interval=args.reload_interval,
        shutdown_delay=args.shutdown_delay,
        verifier=_verifier_options(args),
        kubeconfig=args.kubeconfig,
        limits=tuple(
            (key, getattr(args, flag[2:].replace("-", "_")))
            for flag, (key, _) in LIMIT_FLAGS.items()
            if getattr(args, flag[2:].replace("-", "_")) is not None
        ),
        workers=args.workers,
    )
    settings.mesh_config()  # bad limits fail here, once, naming the key
    _check_port_free(args.host, args.port)
    print(
        f"sidemesh webhook on https://{args.host}:{args.port} with {args.workers} worker(s), "
        f"certificates in {cert_dir}/. Try:\n  {curl_example(args.host, args.port, str(cert_dir))}",
        file=sys.stderr,
        flush=True,
    )
    if args.workers == 1:
        run_worker(settings, metrics_port=args.metrics_port)
        return 0
    LOGGER.info("starting workers", extra={"event": "supervisor", "workers": args.workers})
    return _supervise(settings, args.workers, args.metrics_port)


def _ensure_pki(cert_dir: Path) -> None:
    """A fresh clone has no certificates: create a development root and serving cert.

    Only when something is missing: a mounted Secret is read-only and is never written to.
    """
    from datetime import UTC, datetime

    from webhook.ca import authority as ca
    from webhook.server.logs import LOGGER

    wanted = (ca.CA_CERT, ca.TLS_CERT, ca.TLS_KEY)
    if all((cert_dir / name).exists() for name in wanted):
        return
    ca.ensure_dev_pki(cert_dir, now=datetime.now(UTC))
    LOGGER.info("created a development PKI", extra={"event": "dev-pki", "dir": str(cert_dir)})


def _check_port_free(host: str, port: int) -> None:
    """Fail at start with a clear message if someone else holds the port.

    SO_REUSEPORT lets every process of the same user bind the port again, so a second
    ``sidemesh serve`` would silently share the traffic with the first; a successful connect
    means someone is already listening there.
    """
    import socket

    from webhook.errors import ConfigError
    from webhook.server.app import reuse_port_socket

    probe = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    try:
        socket.create_connection((probe, port), timeout=0.5).close()
    except OSError:
        pass
    else:
        raise ConfigError(f"cannot listen on {host}:{port}: another process is listening there")
    try:
        reuse_port_socket(host, port).close()
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


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
        _start_metrics_port(settings.host, metrics_port, metrics.registry)
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


def _verifier_options(args: argparse.Namespace) -> VerifierOptions:
    from webhook.ca.api import VerifierOptions  # FastAPI: imported only when serving

    return VerifierOptions.from_env(
        jwks_file=args.jwks_file,
        jwks_url=args.jwks_url,
        jwks_issuer=args.jwks_issuer,
        jwks_ca_file=args.jwks_ca_file,
        token_review=args.token_review,
        kubeconfig=args.kubeconfig,
    )


def _ca_parts(
    config: Any, cert_dir: Path, settings: ServeSettings, metrics: Any, trust: Any
) -> tuple[list[Any], list[Any]]:
    """The CA's router (POST /v1/certificates) and its upkeep (caBundle patching, serving cert
    renewal), each only when there is something for it to do."""
    from webhook.ca import api as ca_api  # FastAPI: imported only when serving
    from webhook.ca import upkeep as ca_upkeep

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


# --- the supervisor (--workers N) ---------------------------------------------------------------


def _start_metrics_port(host: str, port: int, registry: Any | None) -> None:
    """Plain-HTTP /metrics for scrapers: ``registry``, or the sum of all workers if ``None``."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client import multiprocess as mp

    if registry is None:
        registry = CollectorRegistry()
        mp.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    start_http_server(port, addr=host, registry=registry)


def _supervise(settings: ServeSettings, workers: int, metrics_port: int | None) -> int:
    from prometheus_client import multiprocess as mp

    from webhook.server.logs import LOGGER
    from webhook.server.metrics import MULTIPROC_ENV

    own_dir = None
    if not os.environ.get(MULTIPROC_ENV):
        own_dir = tempfile.mkdtemp(prefix="sidemesh-metrics-")
        os.environ[MULTIPROC_ENV] = own_dir
    ctx = multiprocessing.get_context("spawn")
    procs: dict[int, multiprocessing.process.BaseProcess] = {}
    stopping = False
    restarts = 0

    def spawn(slot: int) -> None:
        proc = ctx.Process(target=_worker_main, args=(settings,), name=f"sidemesh-worker-{slot}")
        proc.start()
        procs[slot] = proc

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs.values():
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signum)  # SIGTERM drains first, SIGINT stops at once

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for slot in range(workers):
            spawn(slot)
        if metrics_port is not None:
            _start_metrics_port(settings.host, metrics_port, None)
        while not stopping:
            time.sleep(0.2)
            for slot, proc in list(procs.items()):
                if proc.is_alive() or stopping:
                    continue
                if proc.pid is not None:
                    mp.mark_process_dead(proc.pid)  # type: ignore[no-untyped-call]
                delay = _RESTART_BACKOFF[min(restarts, len(_RESTART_BACKOFF) - 1)]
                LOGGER.error(
                    "worker exited, restarting",
                    extra={"event": "supervisor", "pid": proc.pid, "code": proc.exitcode},
                )
                restarts += 1
                time.sleep(delay)
                if not stopping:
                    spawn(slot)
        for proc in procs.values():
            proc.join()
        return 0
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
