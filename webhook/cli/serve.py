"""`sidemesh serve`: the admission webhook (and the mini-CA) over HTTPS.

The command checks what it can before anything starts (config and limits, port, certificates;
it creates a development PKI when the cert dir has none), then runs one worker in this process,
or with ``--workers N`` the supervisor of N worker processes (:mod:`webhook.server.workers`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from webhook.ca.verifiers import VerifierOptions

__all__ = ["LIMIT_FLAGS", "curl_example", "register"]

SAMPLE_REVIEW = "webhook/samples/review.json"


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
    from webhook.config import ClientLimits  # pure and light: no server imports for --help

    defaults = ClientLimits()
    for flag, (key, kind) in LIMIT_FLAGS.items():
        shown = f"limits.{key} (default {getattr(defaults, key):g})"
        limits.add_argument(flag, type=kind, default=None, metavar="N", help=shown)
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
    from webhook.server.workers import ServeSettings, Supervisor, run_worker

    configure_logging(args.log_level)
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    load_config_file(args.config)  # fail here, once, with the key and the value
    cert_dir = Path(args.cert_dir)
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
    _ensure_pki(cert_dir)
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
    return Supervisor(settings, args.workers, args.metrics_port).run()


def _ensure_pki(cert_dir: Path) -> None:
    """A fresh clone has no certificates: create a development root and serving cert.

    Only when something is missing: a mounted Secret is read-only and is never written to.
    """
    from datetime import UTC, datetime

    from webhook.ca import authority as ca
    from webhook.ca.serving import ensure_dev_pki
    from webhook.server.logs import LOGGER

    wanted = (ca.CA_CERT, ca.TLS_CERT, ca.TLS_KEY)
    if all((cert_dir / name).exists() for name in wanted):
        return
    ensure_dev_pki(cert_dir, now=datetime.now(UTC))
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


def _verifier_options(args: argparse.Namespace) -> VerifierOptions:
    from webhook.ca.verifiers import VerifierOptions

    return VerifierOptions.from_env(
        jwks_file=args.jwks_file,
        jwks_url=args.jwks_url,
        jwks_issuer=args.jwks_issuer,
        jwks_ca_file=args.jwks_ca_file,
        token_review=args.token_review,
        kubeconfig=args.kubeconfig,
    )
