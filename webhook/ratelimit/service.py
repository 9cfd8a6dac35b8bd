"""The global rate-limit service: Envoy's ``envoy.service.ratelimit.v3.RateLimitService`` over
gRPC with mTLS (grpcio asyncio), counters in Redis.

Every sidecar with a Global limit asks ``ShouldRateLimit`` once per request it covers; the
answer is OK or OVER_LIMIT per descriptor (:mod:`webhook.ratelimit.window` does the arithmetic,
one pipelined ``INCRBY`` + ``EXPIRE`` per descriptor here). The callers are sidecars: their
client certificate from the mesh CA is required, and its SPIFFE id decides which limits they
may spend. The limits themselves come from the policies the service reads
(:mod:`webhook.ratelimit.table`), never from the request; any number of replicas share the
counts through Redis.

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
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis.asyncio import Redis
from redis.exceptions import RedisError

from webhook.discovery.servingcert import peer_spiffe_id
from webhook.ratelimit.compiler import DOMAIN
from webhook.ratelimit.table import UNKNOWN, LimitTable, judge
from webhook.ratelimit.window import Budget, budget_of

__all__ = ["OnStoreError", "RateLimitService", "serve"]

LOG = logging.getLogger("sidemesh.ratelimit")
OnStoreError = Literal["error", "allow", "deny"]
_R = rls_pb2.RateLimitResponse
_UNITS = {"second": _R.RateLimit.SECOND, "minute": _R.RateLimit.MINUTE,
          "hour": _R.RateLimit.HOUR, "day": _R.RateLimit.DAY}  # fmt: skip


class _Limits(Collector):
    """``sidemesh_ratelimit_limit{limit,per}``: each Global limit the service enforces now,
    read from its table at scrape time (what it knows, not what the sidecars were sent)."""

    def __init__(self, table: Callable[[], LimitTable]) -> None:
        self.table = table

    def collect(self) -> Any:
        family = GaugeMetricFamily(
            "sidemesh_ratelimit_limit",
            "Requests per unit of each Global limit the service knows, by limit and unit",
            labels=["limit", "per"],
        )
        for known in self.table().limits.values():
            family.add_metric([known.limit_id, known.per], known.requests)
        yield family


class Metrics:
    def __init__(self, registry: CollectorRegistry, table: Callable[[], LimitTable]) -> None:
        registry.register(_Limits(table))
        self.decisions = Counter(
            "sidemesh_ratelimit_decisions",
            "Descriptors answered, by policy and code (OK, OVER_LIMIT)",
            ["policy", "code"],
            registry=registry,
        )
        self.store_errors = Counter(
            "sidemesh_ratelimit_store_errors", "Requests Redis could not count", registry=registry
        )
        self.ignored = Counter(
            "sidemesh_ratelimit_ignored_descriptors",
            "Descriptors answered OK without counting, by reason (unknown_limit: no Global "
            "limit of that name; not_the_callers_workload: the policy does not select the "
            "calling sidecar's workload)",
            ["reason"],
            registry=registry,
        )
        self.seconds = Histogram(
            "sidemesh_ratelimit_request_seconds",
            "ShouldRateLimit latency inside the service",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
            registry=registry,
        )


class RateLimitService(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    """``table`` returns the limits as the service knows them now (called per request)."""

    def __init__(
        self,
        redis: Redis,
        table: Callable[[], LimitTable],
        *,
        on_store_error: OnStoreError = "error",
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.table = table
        self.on_store_error = on_store_error
        self.metrics = Metrics(registry or CollectorRegistry(), table)
        self.clock = clock

    async def ShouldRateLimit(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        budgets = self._budgets(request, peer_spiffe_id(context))
        counted = [b for b in budgets if b is not None]
        try:
            counts = await self._count(counted, request.hits_addend or 1)
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

    def _budgets(self, request: Any, caller: str | None) -> list[Budget | None]:
        """One budget per descriptor to count; None for one that is not counted."""
        table = self.table()
        now = self.clock()
        out: list[Budget | None] = []
        for d in request.descriptors:
            entries = [(e.key, e.value) for e in d.entries]
            known, counted, why = judge(table, caller, entries)
            if known is None or request.domain != DOMAIN:
                why = why or UNKNOWN
                self.metrics.ignored.labels(why).inc()
                LOG.debug("not counted (%s): %s from %s", why, entries, caller)
                out.append(None)
                continue
            out.append(budget_of(DOMAIN, counted, known.requests, known.per, now, known.limit_id))
        return out

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


async def serve(service: RateLimitService, address: str, credentials: Any) -> grpc.aio.Server:
    """Start serving ``service`` on ``address`` with ``credentials`` (mTLS, a client
    certificate of the mesh required); the caller stops it."""
    server = grpc.aio.server()
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(service, server)
    if server.add_secure_port(address, credentials) == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    return server
