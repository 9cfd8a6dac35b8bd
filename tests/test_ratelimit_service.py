"""The global rate-limit service over real gRPC with a real redis-server: shared fixed windows,
per-caller budgets, and what happens when Redis is down."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from redis.asyncio import Redis

from tests.support.ports import free_port
from tests.support.redis_server import RedisServer, redis_server
from webhook.ratelimit.service import OnStoreError, RateLimitService, serve
from webhook.ratelimit.window import LimitSyntaxError, budget_of, parse_limit

OK, OVER = rls_pb2.RateLimitResponse.OK, rls_pb2.RateLimitResponse.OVER_LIMIT
#: Mid-window (minute 1000 + 30 s): the tests never straddle a window edge.
NOW = 60_000.0 + 30


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def descriptor(caller: str, limit: str = "3/minute", policy: str = "shop/orders") -> Any:
    entries = [("policy", policy), ("limit", limit), ("caller", caller)]
    return ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries]
    )


async def ask(addresses: list[str], descriptors: list[Any], n: int) -> list[Any]:
    """``n`` requests, round robin over the service ``addresses``: the overall codes."""
    out = []
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    try:
        for i in range(n):
            stub = rls_pb2_grpc.RateLimitServiceStub(channels[i % len(channels)])
            req = rls_pb2.RateLimitRequest(domain="sidemesh", descriptors=descriptors)
            out.append((await stub.ShouldRateLimit(req, timeout=5)).overall_code)
    finally:
        for ch in channels:
            await ch.close()
    return out


def run_services(
    redis_url: str, replicas: int, on_store_error: OnStoreError, body: Any, now: float = NOW
) -> Any:
    async def main() -> Any:
        servers, clients, addresses = [], [], []
        for _ in range(replicas):
            client = Redis.from_url(redis_url, socket_connect_timeout=0.2, socket_timeout=0.2)
            service = RateLimitService(client, on_store_error=on_store_error, clock=lambda: now)
            address = f"127.0.0.1:{free_port()}"
            servers.append(await serve(service, address))
            clients.append(client)
            addresses.append(address)
        try:
            return await body(addresses)
        finally:
            for s in servers:
                await s.stop(None)
            for c in clients:
                await c.aclose()

    return asyncio.run(main())


def test_three_replicas_share_one_budget_per_caller(redis: RedisServer) -> None:
    web = "spiffe://cluster.local/ns/shop/sa/web"
    batch = "spiffe://cluster.local/ns/shop/sa/batch"

    async def body(addresses: list[str]) -> Any:
        first = await ask(addresses, [descriptor(web)], 7)
        other = await ask(addresses, [descriptor(batch)], 3)
        return first, other

    first, other = run_services(redis.url, 3, "error", body)
    assert first == [OK, OK, OK, OVER, OVER, OVER, OVER]
    assert other == [OK, OK, OK]  # another caller has its own budget


def test_the_next_window_starts_afresh(redis: RedisServer) -> None:
    d = [descriptor("spiffe://x/ns/a/sa/b", "2/second", "shop/fresh")]
    for now in (NOW, NOW + 1):
        got = run_services(redis.url, 1, "error", lambda a: ask(a, d, 3), now)
        assert got == [OK, OK, OVER]


def test_a_descriptor_without_a_limit_is_not_counted(redis: RedisServer) -> None:
    plain = ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="policy", value="shop/x")]
    )
    assert run_services(redis.url, 1, "error", lambda a: ask(a, [plain], 5)) == [OK] * 5


def test_a_bad_limit_is_refused_by_name() -> None:
    with pytest.raises(LimitSyntaxError, match="'3/fortnight'"):
        parse_limit("3/fortnight")
    assert budget_of("d", [("limit", "5/hour")], 7200.5) is not None


@pytest.mark.parametrize(
    ("mode", "expected"), [("error", grpc.StatusCode.UNAVAILABLE), ("allow", OK), ("deny", OVER)]
)
def test_redis_down_answers_as_configured(mode: OnStoreError, expected: Any) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there

    async def body(addresses: list[str]) -> Any:
        try:
            return (await ask(addresses, [descriptor("spiffe://x/ns/a/sa/b")], 1))[0]
        except grpc.aio.AioRpcError as exc:
            return exc.code()

    assert run_services(dead, 1, mode, body) == expected
