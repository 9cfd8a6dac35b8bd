"""The global rate-limit service: Envoy's ``envoy.service.ratelimit.v3.RateLimitService`` over
gRPC (grpcio asyncio), counters in Redis.

Every sidecar with a Global limit asks ``ShouldRateLimit`` once per request it covers; the
answer is OK or OVER_LIMIT per descriptor (:mod:`webhook.ratelimit.window` does the arithmetic,
one pipelined ``INCRBY`` + ``EXPIRE`` per descriptor here). The descriptors carry their limit, so
the service reads no policy and any number of replicas behind one Service share the counts
through Redis.

When Redis cannot be reached (``--on-store-error``):

=========  ============================================================================
``error``  answer UNAVAILABLE: the sidecar's ``failureMode`` decides (the default)
``allow``  answer OK (fail open whatever the policy says)
``deny``   answer OVER_LIMIT (fail closed)
=========  ============================================================================
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Literal

import grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from redis.asyncio import Redis
from redis.exceptions import RedisError

from webhook.ratelimit.window import Budget, LimitSyntaxError, budget_of

__all__ = ["OnStoreError", "RateLimitService", "serve"]

LOG = logging.getLogger("sidemesh.ratelimit")
OnStoreError = Literal["error", "allow", "deny"]
_R = rls_pb2.RateLimitResponse
_UNITS = {"second": _R.RateLimit.SECOND, "minute": _R.RateLimit.MINUTE,
          "hour": _R.RateLimit.HOUR, "day": _R.RateLimit.DAY}  # fmt: skip


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "sidemesh_ratelimit_decisions",
            "Descriptors answered, by policy and code (OK, OVER_LIMIT)",
            ["policy", "code"],
            registry=registry,
        )
        self.store_errors = Counter(
            "sidemesh_ratelimit_store_errors", "Requests Redis could not count", registry=registry
        )
        self.seconds = Histogram(
            "sidemesh_ratelimit_request_seconds",
            "ShouldRateLimit latency inside the service",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
            registry=registry,
        )


class RateLimitService(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        redis: Redis,
        *,
        on_store_error: OnStoreError = "error",
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.on_store_error = on_store_error
        self.metrics = Metrics(registry or CollectorRegistry())
        self.clock = clock

    async def ShouldRateLimit(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        now = self.clock()
        hits = request.hits_addend or 1
        budgets: list[Budget | None] = []
        try:
            for d in request.descriptors:
                budgets.append(
                    budget_of(request.domain, [(e.key, e.value) for e in d.entries], now)
                )
        except LimitSyntaxError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        counted = [b for b in budgets if b is not None]
        try:
            counts = await self._count(counted, hits)
        except (RedisError, OSError) as exc:
            self.metrics.store_errors.inc()
            LOG.warning("cannot count in Redis (%s): answering per --on-store-error=%s",
                        exc, self.on_store_error)  # fmt: skip
            if self.on_store_error == "error":
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"counter store: {exc}")
            code = _R.OK if self.on_store_error == "allow" else _R.OVER_LIMIT
            return _R(overall_code=code, statuses=[_R.DescriptorStatus(code=code) for _ in budgets])
        response = self._answer(budgets, dict(zip((b.key for b in counted), counts, strict=True)))
        self.metrics.seconds.observe(time.perf_counter() - started)
        return response

    async def _count(self, budgets: list[Budget], hits: int) -> list[int]:
        if not budgets:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for b in budgets:
            pipe.incrby(b.key, hits)
            pipe.expire(b.key, b.ttl, nx=True)
        results = await pipe.execute()
        return [int(results[2 * i]) for i in range(len(budgets))]

    def _answer(self, budgets: list[Budget | None], counts: dict[str, int]) -> Any:
        statuses = []
        overall = _R.OK
        for b in budgets:
            if b is None:
                statuses.append(_R.DescriptorStatus(code=_R.OK))
                continue
            used = counts[b.key]
            over = used > b.limit
            code = _R.OVER_LIMIT if over else _R.OK
            if over:
                overall = _R.OVER_LIMIT
            self.metrics.decisions.labels(b.policy, _R.Code.Name(code)).inc()
            status = _R.DescriptorStatus(
                code=code,
                current_limit=_R.RateLimit(requests_per_unit=b.limit, unit=_UNITS[b.unit]),
                limit_remaining=max(0, b.limit - used),
            )
            status.duration_until_reset.FromMilliseconds(int(b.reset_in * 1000))
            statuses.append(status)
        return _R(overall_code=overall, statuses=statuses)


async def serve(service: RateLimitService, address: str) -> grpc.aio.Server:
    """Start serving ``service`` on ``address`` (plaintext gRPC); the caller stops it."""
    server = grpc.aio.server()
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(service, server)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    return server
