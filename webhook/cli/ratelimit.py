"""`sidemesh ratelimit`: the global rate-limit service (Envoy's protocol, counters in Redis)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "ratelimit",
        help="the global rate-limit service the sidecars ask about Global limits (Redis)",
        description="Serve envoy.service.ratelimit.v3.RateLimitService over gRPC with mTLS "
        "(sidecars of the mesh only); read the RateLimitPolicy objects as discovery does; count "
        "in Redis, shared by every replica (fixed windows).",
    )
    p.add_argument("--listen", default="0.0.0.0:8081", help="gRPC address (default :8081)")
    p.add_argument(
        "--cert-dir",
        default="certs",
        help="ca.crt (+ ratelimit.crt/ratelimit.key, or ca.key to issue them in memory)",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--mesh-dir", default=None, help="directory of manifests (policies, Pods), watched"
    )
    source.add_argument(
        "--kubernetes",
        action="store_true",
        help="list+watch RateLimitPolicies and Pods through the API server",
    )
    p.add_argument("--kubeconfig", default=None, help="with --kubernetes: kubeconfig file")
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between checks")
    p.add_argument("--config", default=None, help="mesh config file (YAML): the trust domain")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="Redis URL")
    p.add_argument(
        "--on-store-error",
        choices=["error", "allow", "deny"],
        default="error",
        help="Redis unreachable: 'error' lets each sidecar's failureMode decide (default), "
        "'allow' answers OK, 'deny' answers OVER_LIMIT",
    )
    p.add_argument(
        "--store-timeout", type=float, default=0.2, help="seconds to wait for Redis (0.2)"
    )
    p.add_argument("--metrics-host", default="127.0.0.1", help="Prometheus /metrics host")
    p.add_argument("--metrics-port", type=int, default=15016, help="/metrics port (15016)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(handler=_ratelimit)


def _ratelimit(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(_run(args))
    return 0


async def _run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from prometheus_client import CollectorRegistry, start_http_server
    from redis.asyncio import Redis

    from webhook.config import load_config_file
    from webhook.ratelimit.run import ServiceSettings, run_service
    from webhook.ratelimit.service import RateLimitService

    settings = ServiceSettings(
        listen=args.listen,
        cert_dir=Path(args.cert_dir),
        trust_domain=load_config_file(args.config).trust_domain,
        mesh_dir=Path(args.mesh_dir) if args.mesh_dir else None,
        kubernetes=args.kubernetes,
        kubeconfig=args.kubeconfig,
        poll_interval=args.poll_interval,
    )
    registry = CollectorRegistry()
    redis = Redis.from_url(
        args.redis,
        socket_connect_timeout=args.store_timeout,
        socket_timeout=args.store_timeout,
        retry_on_timeout=False,
    )
    start_http_server(args.metrics_port, args.metrics_host, registry=registry)
    try:
        await run_service(
            settings,
            lambda table: RateLimitService(
                redis, table, on_store_error=args.on_store_error, registry=registry
            ),
        )
    finally:
        await redis.aclose()
