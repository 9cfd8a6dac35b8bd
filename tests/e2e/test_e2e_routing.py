"""Traffic rules end to end: real Envoys programmed over ADS, in network namespaces, each
behaviour measured (the figures are printed; ``-s`` shows them). One lab for every test
(``tests/support/routelab.py`` draws it); the rules are ``routelab.RULES``, as a user writes
them: Gateway API routes with a Service parent and sidemesh TrafficPolicies."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator

import pytest

from tests.conftest import envoy_binary, require_root, require_tools
from tests.support.meshlab import SIDEMESH, checked_lab
from tests.support.routelab import IPS, RULES, RouteLab, start_route_lab

pytestmark = [pytest.mark.root, pytest.mark.envoy, pytest.mark.e2e]


def _cluster(service: str, port: int = 80, subset: str = "") -> str:
    return f"cluster.outbound|{port}|{subset}|{service}.demo.svc.cluster.local."


@pytest.fixture(scope="module")
def mesh() -> Iterator[RouteLab]:
    require_root()
    require_tools("ip", "iptables-restore")
    envoy_binary()
    with checked_lab("smroute") as lab:
        m = start_route_lab(lab)
        deadline = time.monotonic() + 30
        while not (m.synced("client") and m.load("split", 1)["statuses"] == {"200": 1}):
            assert time.monotonic() < deadline, "the client never got its routes"
            time.sleep(0.2)
        yield m


def _share(pods: dict[str, int], *names: str) -> float:
    return sum(pods.get(n, 0) for n in names) / max(1, sum(pods.values()))


def test_weighted_split_across_subsets_is_90_10(mesh: RouteLab) -> None:
    result = mesh.load("split", 1000, "--concurrency", "4")
    v2 = _share(result["pods"], "web-3")
    print(f"split 90/10 over 1000 requests: {result['pods']} -> v2 {v2:.1%}")
    assert result["statuses"] == {"200": 1000}
    assert 0.07 <= v2 <= 0.13  # 10 % ± 3 points
    assert set(result["pods"]) == {"web-1", "web-2", "web-3"}  # v1 is both v1 pods


def test_header_match_sends_only_matching_requests_to_the_canary(mesh: RouteLab) -> None:
    tagged = mesh.load("canary", 50, "--header", "x-canary:yes")
    plain = mesh.load("canary", 50)
    print(f"x-canary: yes -> {tagged['pods']}; without -> {plain['pods']}")
    assert tagged["pods"] == {"web-3": 50}
    assert set(plain["pods"]) <= {"web-1", "web-2"} and sum(plain["pods"].values()) == 50


def test_retries_turn_a_half_failing_backend_into_success(mesh: RouteLab) -> None:
    without = mesh.load("noretry", 200, "--path", "/flaky")
    before = mesh.stats("client", _cluster("flaky")).get("upstream_rq_retry", 0)
    with_retries = mesh.load("flaky", 300, "--path", "/flaky")
    retried = mesh.stats("client", _cluster("flaky"))["upstream_rq_retry"] - before
    ok_without = without["statuses"].get("200", 0) / 200
    ok_with = with_retries["statuses"].get("200", 0) / 300
    print(
        f"/flaky: {ok_without:.1%} succeed without retries, {ok_with:.1%} with ({retried} retries)"
    )
    assert 0.4 <= ok_without <= 0.6
    assert ok_with >= 0.99
    assert retried >= 120  # about one per request that failed first


def test_request_timeout_answers_504_at_the_configured_time(mesh: RouteLab) -> None:
    result = mesh.load("slow", 10, "--path", "/slow/1500", "--concurrency", "5")
    print(f"request timeout 300ms, backend 1500ms: {result['statuses']}, ms {result['ms']}")
    assert result["statuses"] == {"504": 10}
    timeouts = mesh.stats("client", _cluster("slow"))["upstream_rq_timeout"]
    assert timeouts >= 10


def test_per_try_timeout_retries_the_slow_try(mesh: RouteLab) -> None:
    plain = mesh.load("slow-plain", 20, "--path", "/slow-odd/1000")
    before = mesh.stats("client", _cluster("slow")).get("upstream_rq_per_try_timeout", 0)
    cut = mesh.load("slow", 20, "--path", "/slow-odd/1000")
    per_try = mesh.stats("client", _cluster("slow"))["upstream_rq_per_try_timeout"] - before
    print(f"every other try 1000ms: without rule ms {plain['ms']}; per-try 200ms ms {cut['ms']}")
    assert plain["statuses"] == {"200": 20} and cut["statuses"] == {"200": 20}
    assert per_try >= 8  # about every other first try was cut and retried


def test_fault_delay_delays_every_request(mesh: RouteLab) -> None:
    result = mesh.load("delayed", 40, "--concurrency", "4")
    injected = sum(
        v for k, v in mesh.stats("client", "http.").items() if k.endswith("fault.delays_injected")
    )
    print(f"fault delay 100ms on 100%: ms {result['ms']}, delays injected {injected}")
    assert result["statuses"] == {"200": 40}
    assert injected >= 40
    assert result["ms"]["p50"] >= 100  # a delay is never shorter than configured


def test_fault_abort_rate_is_the_configured_percentage(mesh: RouteLab) -> None:
    result = mesh.load("aborted", 1000, "--concurrency", "4")
    rate = result["statuses"].get("503", 0) / 1000
    print(f"fault abort 25%: {result['statuses']} -> {rate:.1%} aborted")
    assert set(result["statuses"]) == {"200", "503"}
    assert 0.20 <= rate <= 0.30


def test_circuit_breaker_answers_503_beyond_its_limit(mesh: RouteLab) -> None:
    result = mesh.load("breaker", 20, "--path", "/slow/500", "--concurrency", "20")
    overflow = mesh.stats("client", _cluster("breaker")).get("upstream_rq_pending_overflow", 0)
    print(f"limit 1 connection/1 pending, 20 at once: {result['statuses']}, "
          f"{overflow} pending overflows, ms {result['ms']}")  # fmt: skip
    assert result["statuses"].get("200", 0) >= 1
    # Beyond the limit: 503 at once (Envoy's overflow), not a queue.
    assert result["statuses"].get("503", 0) >= 10 and overflow >= 10


def test_outlier_detection_ejects_the_failing_replica(mesh: RouteLab) -> None:
    first = mesh.load("pool", 30)
    stats = mesh.stats("client", _cluster("pool"))
    after = mesh.load("pool", 60)
    print(f"3 replicas, 1 always 503: first 30 {first['statuses']} {first['pods']}; "
          f"next 60 {after['statuses']} {after['pods']}; ejections "
          f"{stats.get('outlier_detection.ejections_enforced_consecutive_5xx')}")  # fmt: skip
    assert first["statuses"].get("503", 0) <= 4  # ejected after 3 consecutive 5xx
    assert stats["outlier_detection.ejections_enforced_consecutive_5xx"] == 1
    assert after["statuses"] == {"200": 60} and "bad" not in after["pods"]


def test_consistent_hash_keeps_each_header_value_on_one_replica(mesh: RouteLab) -> None:
    result = mesh.load("sticky", 300, "--vary-header", "x-user:10", "--concurrency", "3")
    print(f"ring hash on x-user, 10 users x 30: {result['by_value']}")
    assert result["statuses"] == {"200": 300}
    assert all(len(pods) == 1 for pods in result["by_value"].values())
    assert len(set(result["pods"])) >= 2  # ... and the users are spread over replicas


def test_grpc_route_splits_a_grpc_service(mesh: RouteLab) -> None:
    result = mesh.client("grpc-count", IPS["grpc"], "9090", "1000", "/shop.Ratings/Get")
    share = _share(result["pods"], "web-1")
    print(f"GRPCRoute 80/20 over 1000 calls: {result} -> {share:.1%} to grpc-a")
    assert result["errors"] == {}
    assert 0.76 <= share <= 0.84  # 80 % ± 4 points


def test_header_modifiers_and_mirroring(mesh: RouteLab) -> None:
    before = mesh.stats("client", _cluster("canary-v2")).get("upstream_rq_total", 0)
    answer = mesh.client("get", IPS["mirrored"], "80", "/m", "x-debug:1", "x-tenant:red")
    assert mesh.load("mirrored", 19)["statuses"] == {"200": 19}
    mirrored = mesh.stats("client", _cluster("canary-v2"))["upstream_rq_total"] - before
    print(f"answer {answer}; mirrored to canary-v2: {mirrored} of 20")
    assert answer["status"] == 200 and answer["answer"]["pod"] == "web-2"
    assert answer["answer"]["headers"].get("x-tenant") == "blue"  # set over the caller's
    assert "x-debug" not in answer["answer"]["headers"]  # removed
    assert answer["headers"].get("x-served-by") == "mesh"
    assert mirrored == 20  # every request also went to the mirror (its answer is dropped)


def test_redirect_and_rewrite(mesh: RouteLab) -> None:
    moved = mesh.client("get", IPS["mirrored"], "80", "/old/item?x=1")
    rewritten = mesh.client("get", IPS["mirrored"], "80", "/legacy/item")
    print(f"/old/item?x=1 -> {moved['status']} {moved['headers'].get('location')}; "
          f"/legacy/item reached the app as {rewritten['answer']['path']}")  # fmt: skip
    assert moved["status"] == 301
    assert moved["headers"]["location"].endswith("/new/item?x=1")
    assert rewritten["status"] == 200 and rewritten["answer"]["path"] == "/v2/item"


def test_a_reference_grant_lets_a_route_reach_another_namespace(mesh: RouteLab) -> None:
    result = mesh.load("teller", 20)
    print(f"teller (demo) -> ledger (bank) by a ReferenceGrant: {result['pods']}")
    assert result["pods"] == {"web-3": 20}  # ledger's replica, not teller's own (web-1)


def test_proxy_config_shows_each_route_with_its_rule(mesh: RouteLab) -> None:
    done = mesh.cp.ns.run([*SIDEMESH, "proxy-config", "demo/client", "--routes"], timeout=20)
    print(done.stdout[:1500])
    assert "HTTPRoute demo/split rules[0]" in done.stdout
    assert "TrafficPolicy demo/flaky" in done.stdout


def test_a_rule_change_reaches_the_client(mesh: RouteLab) -> None:
    """All of split to v2: how long from the file write to the client's ACK."""
    route = copy.deepcopy(RULES["route-split"])
    route["spec"]["rules"][0]["backendRefs"][0]["weight"] = 0
    generation = mesh.debug("/debug/proxies")["proxies"][0]["generation"]
    started = time.monotonic()
    mesh.write("route-split", route)
    deadline = started + 15
    while True:
        status = mesh.debug("/debug/proxies")
        client = next(p for p in status["proxies"] if p["pod"] == "demo/client")
        if client["generation"] > generation and client["synced"]:
            break
        assert time.monotonic() < deadline, "the change never reached the client"
        time.sleep(0.02)
    took = time.monotonic() - started
    result = mesh.load("split", 100)
    print(f"weights 90/10 -> 0/100: client ACKed {took * 1000:.0f} ms after the write "
          f"(files polled every 200 ms, then 100 ms debounce); then {result['pods']}")  # fmt: skip
    assert result["pods"] == {"web-3": 100}
