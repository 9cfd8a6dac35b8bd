"""What access policy and rate limits cost a request, and what the rate-limit service sustains.

One real Envoy (``--concurrency 1``) on 127.0.0.1 with one HTTP connection manager that answers
200 itself (direct response: only the filters in front of it differ between cases), driven by
``wrk`` on one keep-alive connection. The filter configs are the ones the compilers hand the
sidecars (inline here instead of over ECDS: the same filter code runs per request).

RBAC cases: no filters at all; the four pass-through filters every sidecar carries; 10 and 100
DENY rules, none matching (every rule is evaluated for every request: the worst case).
Rate-limit cases: no filter; a Global limit asked of ``sidemesh ratelimit`` (a subprocess, over
mTLS with a workload certificate, as a sidecar asks) with its counters in a real
``redis-server``. Then the service alone: decisions per second with
32 concurrent gRPC callers from this process.

    .venv/bin/python tests/bench/bench_policy.py     # table on stdout,
                                                     # JSON in bench-results/policy.json
``BENCH_SECONDS`` (default 5) sets each run's length.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from tests.bench.results import write_results  # noqa: E402
from tests.conftest import envoy_binary  # noqa: E402
from tests.support.podrunner import sidemesh_argv  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.redis_server import redis_server  # noqa: E402
from tests.support.xds import make_ca, workload_cert  # noqa: E402
from webhook.dataplane.bootstrap import BootstrapOptions, render_sds, sds_dir  # noqa: E402
from webhook.policy.compiler import compile_workload  # noqa: E402
from webhook.policy.model import parse_policy  # noqa: E402
from webhook.ratelimit.compiler import (  # noqa: E402
    CLUSTER,
    compile_limits,
    service_cluster,
    service_identity,
)
from webhook.ratelimit.model import parse_limit_policy  # noqa: E402

PER_CALLER = os.environ.get("PER_CALLER", "1") == "1"
#: Each case runs this many times, interleaved with the others; medians are reported (the
#: machine is shared: one run of a case alone says little).
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1000.0}
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def rbac_filters(rules: int | None) -> list[dict[str, Any]]:
    if rules is None:
        return []
    policies = [
        parse_policy(
            {
                "metadata": {"name": f"p-{i:03}", "namespace": "bench"},
                "spec": {
                    "action": "DENY",
                    "rules": [
                        {
                            "from": [{"serviceAccount": f"bench/caller-{i}"}],
                            "to": {"paths": [f"/admin-{i}*"], "methods": ["DELETE"]},
                        }
                    ],
                },
            }
        )
        for i in range(rules)
    ]
    filters = compile_workload(policies, "cluster.local").filters
    out = []
    for name, cfg in filters.items():
        if name.startswith("sidemesh.authz.http"):
            out.append({"name": name, "typed_config": dict(cfg)})
    return out


LIMIT_POLICY: dict[str, Any] = {
    "metadata": {"name": "bench", "namespace": "bench"},
    "spec": {"limits": [{"requests": 1_000_000_000, "per": "minute", "perCaller": PER_CALLER}]},
}


def limit_filters(on: bool) -> list[dict[str, Any]]:
    if not on:
        return []
    policy = parse_limit_policy(LIMIT_POLICY)
    cfg = compile_limits([policy], service=True)["sidemesh.ratelimit.global"]
    return [{"name": "sidemesh.ratelimit.global", "typed_config": cfg}]


def _listener(name: str, port: int, route: dict[str, Any], filters: list[Any]) -> Any:
    hcm = {
        "@type": _HCM + "HttpConnectionManager",
        "stat_prefix": name,
        "route_config": {
            "virtual_hosts": [
                {"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, **route}]}
            ]
        },
        "http_filters": [*filters, {"name": "router", "typed_config": {"@type": _ROUTER}}],
    }
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager",
                          "typed_config": hcm}]}
        ],
    }  # fmt: skip


def bootstrap(
    port: int, admin: int, filters: list[dict[str, Any]], rls: dict[str, Any] | None
) -> dict[str, Any]:
    """The measured listener routes to an app (a second listener answering 200 itself), as a
    sidecar's inbound side routes to its app: filters that act on routed requests (the rate
    limit) see the same route they see in a sidecar."""
    app = port + 1 if port < 65535 else port - 1
    clusters = [
        {
            "name": "app",
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": "app",
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": app}}}}]}],
            },
        }
    ]  # fmt: skip
    if rls:
        clusters.append(rls)
    ok = {"direct_response": {"status": 200, "body": {"inline_string": "ok"}}}
    return {
        "node": {"id": "bench", "cluster": "bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                _listener("bench", port, {"route": {"cluster": "app"}}, filters),
                _listener("app", app, ok, []),
            ],
            "clusters": clusters,
        },
    }


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not m:
        raise ValueError(f"cannot read wrk latency {text!r}")
    return float(m.group(1)) * _UNIT[m.group(2)]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_case(filters: list[dict[str, Any]], rls: dict[str, Any] | None = None) -> dict[str, float]:
    port, admin = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "envoy.json"
        path.write_text(json.dumps(bootstrap(port, admin, filters, rls)))
        argv = [envoy_binary(), "-c", str(path), "--concurrency", "1", "--log-level", "error",
                "--disable-hot-restart", "--base-id", str(admin)]  # fmt: skip
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}/api/items"
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(url, timeout=1) as r:
                        assert r.status == 200
                    break
                except OSError:
                    assert time.monotonic() < deadline, "envoy did not come up"
                    time.sleep(0.1)
            before = _cpu_seconds(proc.pid)
            out = subprocess.run(
                ["wrk", "-t1", "-c1", f"-d{SECONDS}s", "--latency", url],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            cpu = _cpu_seconds(proc.pid) - before
            if rls and filters:  # the service answered (a failed call passes too: fail open)
                stats_url = f"http://127.0.0.1:{admin}/stats?filter=ratelimit"
                with urllib.request.urlopen(stats_url, timeout=5) as r:
                    ok = r.read().decode()
                assert re.search(r"ratelimit\.sidemesh_global\.ok: [1-9]", ok), ok
        finally:
            proc.terminate()
            proc.wait(10)
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    assert non2xx is None, out  # every request passed the filters
    return {
        "requests": total,
        "p50_ms": _ms(lat["50"]),
        "p99_ms": _ms(lat["99"]),
        "envoy_cpu_us_per_request": cpu / total * 1e6,
    }


async def _hammer(address: str, seconds: float, concurrency: int, certs: Path) -> dict[str, float]:
    import grpc
    from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
    from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

    entries = [("policy", "bench/bench")]
    latencies: list[float] = []
    creds = grpc.ssl_channel_credentials(
        (certs / "ca.crt").read_bytes(),
        (certs / "key.pem").read_bytes(),
        (certs / "cert.pem").read_bytes(),
    )
    options = [("grpc.ssl_target_name_override", "localhost")]
    async with grpc.aio.secure_channel(address, creds, options) as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        deadline = time.monotonic() + seconds

        async def worker(n: int) -> None:
            d = ratelimit_pb2.RateLimitDescriptor(
                entries=[
                    *(ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries),
                    ratelimit_pb2.RateLimitDescriptor.Entry(key="caller", value=f"c{n}"),
                ]
            )
            req = rls_pb2.RateLimitRequest(domain="sidemesh", descriptors=[d])
            while time.monotonic() < deadline:
                t = time.perf_counter()
                await stub.ShouldRateLimit(req, timeout=5)
                latencies.append(time.perf_counter() - t)

        start = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.monotonic() - start
    latencies.sort()
    return {
        "decisions_per_s": len(latencies) / elapsed,
        "p50_ms_at_32_concurrent": latencies[len(latencies) // 2] * 1000,
    }


def _wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    import socket

    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, "sidemesh ratelimit exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, "sidemesh ratelimit did not listen"
            time.sleep(0.1)


def _mesh_identities(tmp: Path, rls: str) -> tuple[dict[str, Any], Path, Path, Path]:
    """What the mTLS hop to the service needs: a mesh CA (the service issues its certificate
    from it), the bench workload's certificate and SDS files (as the agent lays them out), the
    limit and the Pod it selects in a manifest directory, and the sidecar's cluster to the
    service: ``(cluster, ca dir, mesh dir, workload cert dir)``."""
    ca = make_ca(tmp / "ca")
    opts = BootstrapOptions(
        pod_name="bench-1", pod_namespace="bench", service_account="bench",
        cert_dir=str(tmp / "certs"), work_dir=str(tmp / "work"),
    )  # fmt: skip
    workload_cert(ca, opts.spiffe_id, tmp / "certs")
    Path(sds_dir(opts.work_dir)).mkdir(parents=True)
    for name, content in render_sds(opts).items():
        (Path(sds_dir(opts.work_dir)) / name).write_text(json.dumps(content))
    (tmp / "mesh").mkdir()
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "bench-1", "namespace": "bench"},
        "spec": {"serviceAccountName": "bench", "containers": [{"name": "a", "image": "a"}]},
    }
    policy = {"apiVersion": "sidemesh.io/v1alpha1", "kind": "RateLimitPolicy", **LIMIT_POLICY}
    (tmp / "mesh" / "pod.json").write_text(json.dumps(pod))
    (tmp / "mesh" / "limit.json").write_text(json.dumps(policy))
    cluster = service_cluster(rls, opts, service_identity(opts.trust_domain))
    return cluster, tmp / "ca", tmp / "mesh", tmp / "certs"


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> int:
    results: dict[str, Any] = {}
    rbac_cases = {"no RBAC filters": None, "pass-through filters": 0, "10 rules": 10,
                  "100 rules": 100}  # fmt: skip
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in rbac_cases}
    for _ in range(ROUNDS):
        for label, rules in rbac_cases.items():
            runs[label].append(run_case(rbac_filters(rules)))
    for label in rbac_cases:
        results[f"rbac: {label}"] = _median(runs[label])
        print(f"rbac: {label}", results[f"rbac: {label}"], flush=True)
    with redis_server() as redis, tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        cluster, ca_dir, mesh_dir, certs = _mesh_identities(Path(tmp), f"127.0.0.1:{port}")
        rls = subprocess.Popen(
            [*sidemesh_argv(), "ratelimit", "--listen", f"127.0.0.1:{port}", "--redis", redis.url,
             "--cert-dir", str(ca_dir), "--mesh-dir", str(mesh_dir),
             "--metrics-port", str(free_port()), "--log-level", "warning"],
        )  # fmt: skip
        try:
            _wait_port(port, rls)
            rl_cases = {"no rate-limit filter": False, "global limit": True}
            rl_runs: dict[str, list[dict[str, float]]] = {k: [] for k in rl_cases}
            for _ in range(ROUNDS):
                for label, on in rl_cases.items():
                    rl_runs[label].append(run_case(limit_filters(on), cluster))
            for label in rl_cases:
                results[f"ratelimit: {label}"] = _median(rl_runs[label])
                print(f"ratelimit: {label}", results[f"ratelimit: {label}"], flush=True)
            service = asyncio.run(_hammer(f"127.0.0.1:{port}", SECONDS, 32, certs))
            results["ratelimit service"] = service
            print("ratelimit service", service, flush=True)
        finally:
            rls.terminate()
            rls.wait(10)
    assert CLUSTER  # the cluster name the global filter asks through
    write_results("policy", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
