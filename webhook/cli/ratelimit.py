"""`sidemesh ratelimit`: the global rate-limit service (Envoy's protocol, counters in Redis)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "ratelimit",
        help="the global rate-limit service the sidecars ask about Global limits (Redis)",
        description="Serve envoy.service.ratelimit.v3.RateLimitService over gRPC; count in "
        "Redis, shared by every replica (fixed windows).",
    )
    p.add_argument("--listen", default="0.0.0.0:8081", help="gRPC address (default :8081)")
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
    import asyncio
    import logging
    import signal

    from prometheus_client import CollectorRegistry, start_http_server
    from redis.asyncio import Redis

    from webhook.ratelimit.service import RateLimitService, serve

    registry = CollectorRegistry()
    redis = Redis.from_url(
        args.redis,
        socket_connect_timeout=args.store_timeout,
        socket_timeout=args.store_timeout,
        retry_on_timeout=False,
    )
    service = RateLimitService(redis, on_store_error=args.on_store_error, registry=registry)
    start_http_server(args.metrics_port, args.metrics_host, registry=registry)
    server = await serve(service, args.listen)
    logging.getLogger("sidemesh.ratelimit").info(
        "rate-limit service on %s, counters in %s", args.listen, args.redis
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)
    await redis.aclose()
