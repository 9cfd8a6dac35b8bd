"""The global rate-limit service over real gRPC with mTLS and a real redis-server: shared fixed
windows, per-caller budgets, limits it reads itself, callers it checks, and what happens when
Redis is down."""

from __future__ import annotations

import asyncio
import copy
import logging
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from tests.support.apiserver_standin import APIServerStandin
from tests.support.jwks_issuer import Issuer
from tests.support.podrunner import sidemesh_argv
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer, redis_server
from tests.support.wait import wait_for
from tests.support.xds import make_ca, workload_cert
from webhook.discovery.servingcert import serving_credentials
from webhook.ratelimit.run import service_name
from webhook.ratelimit.service import OnStoreError, RateLimitService, serve
from webhook.ratelimit.table import FOREIGN, UNKNOWN, LimitTable, build_table, judge

OK, OVER = rls_pb2.RateLimitResponse.OK, rls_pb2.RateLimitResponse.OVER_LIMIT
#: Mid-window (minute 1000 + 30 s): the tests never straddle a window edge.
NOW = 60_000.0 + 30
TD = "cluster.local"
ORDERS = f"spiffe://{TD}/ns/shop/sa/orders"  # the sidecar of the limited workload
WEB = f"spiffe://{TD}/ns/shop/sa/web"  # callers of orders
BATCH = f"spiffe://{TD}/ns/shop/sa/batch"


def _policy(name: str, limits: list[dict[str, Any]], app: str = "orders") -> dict[str, Any]:
    return {
        "apiVersion": "sidemesh.io/v1alpha1",
        "kind": "RateLimitPolicy",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"selector": {"matchLabels": {"app": app}}, "limits": limits},
    }


def _pod(name: str, sa: str, app: str) -> dict[str, Any]:
    meta = {"name": name, "namespace": "shop", "labels": {"app": app}}
    return {"kind": "Pod", "metadata": meta, "spec": {"serviceAccountName": sa}}


TABLE = build_table(
    [
        _policy("orders", [{"requests": 3, "per": "minute", "perCaller": True}]),
        _policy("fresh", [{"requests": 2, "per": "second"}]),
        _policy("local", [{"requests": 9, "per": "second", "scope": "Local"}]),
        _policy("web", [{"requests": 1, "per": "minute"}], app="web"),
    ],
    [_pod("orders-1", "orders", "orders"), _pod("web-1", "web", "web")],
    TD,
)


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mesh CA (the service issues its certificate from it in memory), the orders and web
    sidecars' certificates, and a certificate of ORDERS' id from another CA."""
    tmp = tmp_path_factory.mktemp("rlpki")
    ca = make_ca(tmp / "ca")
    workload_cert(ca, ORDERS, tmp / "orders")
    workload_cert(ca, WEB, tmp / "web")
    workload_cert(make_ca(tmp / "evil-ca"), ORDERS, tmp / "evil")
    (tmp / "evil" / "ca.crt").write_text((tmp / "ca" / "ca.crt").read_text())
    return tmp


def descriptor(
    caller: str = WEB, policy: str = "shop/orders", **extra: str
) -> ratelimit_pb2.RateLimitDescriptor:
    entries = [("policy", policy), ("caller", caller), *extra.items()]
    return ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries]
    )


def channel(address: str, certs: Path | None, root: Path) -> grpc.aio.Channel:
    """A channel that verifies the service is ``sidemesh-ratelimit`` of the mesh CA, presenting
    ``certs`` (a sidecar's cert.pem/key.pem) or no certificate at all."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=(root / "ca.crt").read_bytes(),
        private_key=(certs / "key.pem").read_bytes() if certs else None,
        certificate_chain=(certs / "cert.pem").read_bytes() if certs else None,
    )
    name = "sidemesh-ratelimit.sidemesh-system.svc"
    return grpc.aio.secure_channel(address, creds, [("grpc.ssl_target_name_override", name)])


async def ask(
    addresses: list[str], descriptors: list[Any], n: int, certs: Path | None, root: Path
) -> list[Any]:
    """``n`` requests, round robin over the service ``addresses``: the overall codes."""
    out = []
    channels = [channel(a, certs, root) for a in addresses]
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
    pki: Path,
    redis_url: str,
    replicas: int,
    body: Any,
    *,
    on_store_error: OnStoreError = "error",
    now: float = NOW,
    registry: CollectorRegistry | None = None,
    table: LimitTable = TABLE,
) -> Any:
    async def main() -> Any:
        servers, clients, addresses = [], [], []
        creds = serving_credentials(pki / "ca", service_name(TD), logging.getLogger("test"))
        for _ in range(replicas):
            client = Redis.from_url(redis_url, socket_connect_timeout=0.2, socket_timeout=0.2)
            service = RateLimitService(
                client,
                lambda: table,
                on_store_error=on_store_error,
                clock=lambda: now,
                registry=registry,
            )
            address = f"127.0.0.1:{free_port()}"
            servers.append(await serve(service, address, creds))
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


def test_three_replicas_share_one_budget_per_caller(pki: Path, redis: RedisServer) -> None:
    async def body(addresses: list[str]) -> Any:
        first = await ask(addresses, [descriptor(WEB)], 7, pki / "orders", pki / "ca")
        other = await ask(addresses, [descriptor(BATCH)], 3, pki / "orders", pki / "ca")
        return first, other

    first, other = run_services(pki, redis.url, 3, body)
    assert first == [OK, OK, OK, OVER, OVER, OVER, OVER]
    assert other == [OK, OK, OK]  # another caller has its own budget


def test_a_forged_higher_limit_in_the_request_changes_nothing(
    pki: Path, redis: RedisServer
) -> None:
    """The descriptor's ``limit`` entry is ignored: the policy says 3 a minute, and the
    forged entry neither raises that nor opens a budget of its own."""
    forged = descriptor(BATCH, "shop/orders", limit="1000000/minute")

    async def body(addresses: list[str]) -> Any:
        return await ask(addresses, [forged], 5, pki / "orders", pki / "ca")

    registry = CollectorRegistry()
    assert run_services(pki, redis.url, 1, body, now=NOW + 60, registry=registry) == [
        OK, OK, OK, OVER, OVER,
    ]  # fmt: skip
    spent = registry.get_sample_value(
        "sidemesh_ratelimit_decisions_total", {"policy": "shop/orders", "code": "OVER_LIMIT"}
    )
    assert spent == 2
    # What the service enforces, as it says on /metrics: the policy's size.
    size = {"limit": "shop/orders", "per": "minute"}
    assert registry.get_sample_value("sidemesh_ratelimit_limit", size) == 3


def test_only_the_selected_workloads_sidecar_spends_its_limits(
    pki: Path, redis: RedisServer
) -> None:
    """web's sidecar asking about orders' limit is answered OK and counts nothing: it can
    neither spend orders' budget nor be limited by it. Unknown limits are not counted."""
    registry = CollectorRegistry()

    async def body(addresses: list[str]) -> Any:
        foreign = await ask(addresses, [descriptor(BATCH)], 4, pki / "web", pki / "ca")
        unknown = await ask(addresses, [descriptor(policy="shop/nope")], 4, pki / "orders",
                            pki / "ca")  # fmt: skip
        # The Local limit is each sidecar's own: the service does not count it either.
        local = await ask(addresses, [descriptor(policy="shop/local")], 2, pki / "orders",
                          pki / "ca")  # fmt: skip
        own = await ask(addresses, [descriptor(BATCH)], 4, pki / "orders", pki / "ca")
        return foreign, unknown, local, own

    foreign, unknown, local, own = run_services(
        pki, redis.url, 1, body, now=NOW + 120, registry=registry
    )
    assert foreign == [OK] * 4 and unknown == [OK] * 4 and local == [OK] * 2
    assert own == [OK, OK, OK, OVER]  # the foreign asks spent none of it
    ignored = "sidemesh_ratelimit_ignored_descriptors_total"
    assert registry.get_sample_value(ignored, {"reason": FOREIGN}) == 4
    assert registry.get_sample_value(ignored, {"reason": UNKNOWN}) == 6


def test_the_next_window_starts_afresh(pki: Path, redis: RedisServer) -> None:
    d = [descriptor(policy="shop/fresh")]
    for now in (NOW, NOW + 1):
        got = run_services(
            pki, redis.url, 1, lambda a: ask(a, d, 3, pki / "orders", pki / "ca"), now=now
        )
        assert got == [OK, OK, OVER]


@pytest.mark.parametrize("client", ["none", "evil"])
def test_a_caller_without_a_mesh_certificate_is_refused_at_the_handshake(
    pki: Path, redis: RedisServer, client: str
) -> None:
    certs = None if client == "none" else pki / "evil"

    async def body(addresses: list[str]) -> Any:
        try:
            return await ask(addresses, [descriptor()], 1, certs, pki / "ca")
        except grpc.aio.AioRpcError as exc:
            return exc.code()

    assert run_services(pki, redis.url, 1, body) == grpc.StatusCode.UNAVAILABLE


def test_the_service_is_its_service_account(pki: Path, redis: RedisServer) -> None:
    """Its certificate names ``sidemesh-ratelimit``: what every sidecar requires of it."""
    assert service_name(TD).spiffe_id == f"spiffe://{TD}/ns/sidemesh-system/sa/sidemesh-ratelimit"

    async def body(addresses: list[str]) -> Any:
        host, _, port = addresses[0].rpartition(":")
        pem = await asyncio.to_thread(_served_certificate, host, int(port), pki)
        return pem

    pem = run_services(pki, redis.url, 1, body)
    cert = x509.load_pem_x509_certificate(pem.encode())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == [service_name(TD).spiffe_id]


def _served_certificate(host: str, port: int, pki: Path) -> str:
    ctx = ssl.create_default_context(cafile=str(pki / "ca" / "ca.crt"))
    ctx.check_hostname = False
    ctx.load_cert_chain(pki / "orders" / "cert.pem", pki / "orders" / "key.pem")
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, port), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return ssl.DER_cert_to_PEM_cert(der)


@pytest.mark.parametrize(
    ("mode", "expected"), [("error", grpc.StatusCode.UNAVAILABLE), ("allow", OK), ("deny", OVER)]
)
def test_redis_down_answers_as_configured(pki: Path, mode: OnStoreError, expected: Any) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there

    async def body(addresses: list[str]) -> Any:
        try:
            return (await ask(addresses, [descriptor()], 1, pki / "orders", pki / "ca"))[0]
        except grpc.aio.AioRpcError as exc:
            return exc.code()

    assert run_services(pki, dead, 1, body, on_store_error=mode) == expected


def test_the_table_takes_sizes_from_policies_and_callers_from_pods() -> None:
    assert set(TABLE.limits) == {"shop/orders", "shop/fresh", "shop/web"}  # Global only
    orders = TABLE.limits["shop/orders"]
    assert (orders.requests, orders.per, orders.callers) == (3, "minute", frozenset({ORDERS}))
    entries = [("policy", "shop/orders"), ("limit", "9/second"), ("caller", WEB)]
    known, counted, _ = judge(TABLE, ORDERS, entries)
    assert known is orders and counted == (("policy", "shop/orders"), ("caller", WEB))
    assert judge(TABLE, WEB, entries)[2] == FOREIGN
    assert judge(TABLE, None, entries)[2] == FOREIGN
    assert judge(TABLE, ORDERS, [("policy", "shop/gone")])[2] == UNKNOWN
    broken = build_table([_policy("bad", [{"requests": 0, "per": "minute"}])], [], TD)
    assert broken.limits == {}
    assert "requests must be a positive integer" in broken.errors["shop/bad"]


def test_sidecars_reach_the_service_with_their_own_certificate_and_check_its_identity() -> None:
    """The cluster every sidecar asks through: the workload's certificate by SDS, the mesh
    root, and exactly the service's SPIFFE id (a mesh workload cannot pose as it)."""
    from webhook.dataplane.bootstrap import BootstrapOptions
    from webhook.ratelimit.compiler import service_cluster, service_identity

    opts = BootstrapOptions(pod_name="web-1", pod_namespace="shop", service_account="web")
    cluster = service_cluster("sidemesh-ratelimit.sidemesh-system.svc:8081", opts,
                              service_identity(TD))  # fmt: skip
    tls = cluster["transport_socket"]["typed_config"]
    ctx = tls["common_tls_context"]
    assert [s["name"] for s in ctx["tls_certificate_sds_secret_configs"]] == ["default"]
    validation = ctx["combined_validation_context"]
    assert validation["validation_context_sds_secret_config"]["name"] == "ROOTCA"
    assert validation["default_validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": service_name(TD).spiffe_id}}
    ]
    assert tls["sni"] == "sidemesh-ratelimit.sidemesh-system.svc"


def test_standin_the_service_reads_limits_and_pods_by_list_and_watch(
    pki: Path, redis: RedisServer, issuer: Issuer, tmp_path: Path
) -> None:
    """``sidemesh ratelimit --kubernetes`` against the API-server stand-in: the limit it
    enforces is the policy's, and follows the policy when it changes."""
    with APIServerStandin(tmp_path / "standin", issuer) as api:
        api.objects.add(_pod("orders-1", "orders", "orders"))
        policy = _policy("watched", [{"requests": 2, "per": "hour"}])
        api.objects.add(copy.deepcopy(policy))
        port, metrics = free_port(), free_port()
        proc = subprocess.Popen(
            [*sidemesh_argv(), "ratelimit", "--kubernetes",
             "--kubeconfig", str(api.kubeconfig(tmp_path / "kubeconfig")),
             "--listen", f"127.0.0.1:{port}", "--cert-dir", str(pki / "ca"),
             "--redis", redis.url, "--metrics-port", str(metrics), "--log-level", "warning"],
        )  # fmt: skip
        try:
            wait_for(lambda: _limit_on(metrics) == 2.0, timeout=30)
            d = [descriptor(WEB, "shop/watched")]
            got = asyncio.run(ask([f"127.0.0.1:{port}"], d, 3, pki / "orders", pki / "ca"))
            assert got == [OK, OK, OVER]
            policy["spec"]["limits"][0]["requests"] = 5
            api.objects.modify(policy)
            wait_for(lambda: _limit_on(metrics) == 5.0, timeout=30)
            got = asyncio.run(ask([f"127.0.0.1:{port}"], d, 3, pki / "orders", pki / "ca"))
            assert got == [OK, OK, OVER]  # the same hour's counter: 3, 4, 5 → the 6th is over
        finally:
            proc.terminate()
            proc.wait(10)


def _limit_on(metrics_port: int) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith('sidemesh_ratelimit_limit{limit="shop/watched"'):
            return float(line.rsplit(" ", 1)[1])
    return None
