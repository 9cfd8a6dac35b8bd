"""Benchmark: the traffic-rules compiler at mesh scale, in-process.

N Services, each with an HTTPRoute of three rules (a header match, a 90/10 split over two
subsets, a path rule with timeouts) and a TrafficPolicy (subsets, retries, outlier detection,
circuit breaking). Measured: ``build_table`` (parse every rule, resolve against the mesh,
order by precedence) cold and warm (with the push engine's parse cache: what a rebuild pays
when the rules did not change), then building every Service port's routes, cluster and subset
clusters as Envoy JSON and encoding them (a first push; later rebuilds build and encode only
what changed). They bound how fast a rule change reaches the sidecars. Prints a table,
writes bench-results/routing.json.

    .venv/bin/python tests/bench/bench_routing.py [--sizes 100,1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.bench.results import write_results  # noqa: E402
from webhook.dataplane.bootstrap import BootstrapOptions  # noqa: E402
from webhook.discovery import compiler as cc  # noqa: E402
from webhook.discovery.build import build_model  # noqa: E402
from webhook.discovery.l7 import route_config  # noqa: E402
from webhook.discovery.parsecache import ParseCache  # noqa: E402
from webhook.discovery.resources import encode  # noqa: E402
from webhook.routing import xds  # noqa: E402
from webhook.routing.table import build_table  # noqa: E402


def _mesh(n: int) -> dict[str, list[dict[str, Any]]]:
    objs: dict[str, list[dict[str, Any]]] = {
        k: [] for k in ("Service", "EndpointSlice", "Pod", "HTTPRoute", "TrafficPolicy")
    }
    for i in range(n):
        name, ns = f"svc-{i}", f"ns-{i % 20}"
        objs["Service"].append({"kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": f"10.96.{i // 250}.{i % 250 + 1}",
                     "ports": [{"name": "http", "port": 80}]}})  # fmt: skip
        eps = []
        for r in range(3):
            pod = f"{name}-{r}"
            ip = f"10.{100 + i // 250}.{i % 250}.{r + 1}"
            objs["Pod"].append({"kind": "Pod", "metadata": {"name": pod, "namespace": ns,
                "labels": {"version": "v2" if r == 2 else "v1"},
                "annotations": {"sidemesh.io/status": "{}"}},
                "spec": {"serviceAccountName": name}, "status": {"podIP": ip}})  # fmt: skip
            eps.append({"addresses": [ip], "conditions": {"ready": True},
                        "targetRef": {"kind": "Pod", "namespace": ns, "name": pod}})  # fmt: skip
        objs["EndpointSlice"].append({"kind": "EndpointSlice", "metadata": {"name": name,
            "namespace": ns, "labels": {"kubernetes.io/service-name": name}},
            "ports": [{"name": "http", "port": 8080}], "endpoints": eps})  # fmt: skip
        sub = {"group": "sidemesh.io", "kind": "ServiceSubset", "port": 80}
        objs["HTTPRoute"].append({"kind": "HTTPRoute", "metadata": {"name": name, "namespace": ns},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": name}], "rules": [
                {"matches": [{"headers": [{"name": "x-canary", "value": "yes"}]}],
                 "backendRefs": [{**sub, "name": f"{name}.v2"}]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                 "timeouts": {"request": "2s", "backendRequest": "500ms"},
                 "backendRefs": [{"name": name, "port": 80}]},
                {"backendRefs": [{**sub, "name": f"{name}.v1", "weight": 90},
                                 {**sub, "name": f"{name}.v2", "weight": 10}]}]}})  # fmt: skip
        objs["TrafficPolicy"].append({"kind": "TrafficPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"targetRef": {"kind": "Service", "name": name},
                     "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                 {"name": "v2", "labels": {"version": "v2"}}],
                     "retries": {"attempts": 2, "perTryTimeout": "250ms"},
                     "outlierDetection": {"consecutive5xx": 5},
                     "connectionPool": {"maxConnections": 100}}})  # fmt: skip
    return objs


def _build_all(model: Any, table: Any) -> list[tuple[str, dict[str, Any]]]:
    """What every rebuild computes to compare with the last one (Envoy JSON dicts)."""
    opts = BootstrapOptions("p", "default", "p")
    out = []
    for svc in model.services.values():
        for port in svc.ports:
            eps = model.endpoints_of(svc, port)
            out.append((cc.CLUSTER, xds.service_cluster(table, svc, port, eps, opts)))
            out.append((cc.ROUTE, route_config(svc, port, xds.port_routes(table, svc, port))))
        for cluster, cla, _ in xds.extra_clusters(table, model, svc, opts).values():
            out += [(cc.CLUSTER, cluster), (cc.ENDPOINTS, cla)]
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="100,1000")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    results = []
    print(f"{'services':>8}  {'build_table ms':>15}  {'warm ms':>8}  {'build dicts ms':>15}  "
          f"{'encode ms':>10}  resources")  # fmt: skip
    for n in (int(x) for x in args.sizes.split(",")):
        objs = _mesh(n)
        model = build_model(objs)
        tables: list[float] = []
        warm: list[float] = []
        builds: list[float] = []
        encodes: list[float] = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            table = build_table(objs, model)
            t1 = time.perf_counter()
            built = _build_all(model, table)
            t2 = time.perf_counter()
            for type_url, resource in built:
                encode(type_url, resource)
            t3 = time.perf_counter()
            tables.append((t1 - t0) * 1000)
            cache = ParseCache()
            build_table(objs, model, cache)
            t4 = time.perf_counter()
            build_table(objs, model, cache)  # the push engine's rebuild: rules parsed before
            warm.append((time.perf_counter() - t4) * 1000)
            builds.append((t2 - t1) * 1000)
            encodes.append((t3 - t2) * 1000)
        assert not table.problems, table.problems[:3]
        row = {"services": n, "build_table_ms": statistics.median(tables),
               "build_table_warm_ms": statistics.median(warm),
               "build_dicts_ms": statistics.median(builds),
               "encode_ms": statistics.median(encodes), "resources": len(built)}  # fmt: skip
        results.append(row)
        print(f"{n:>8}  {row['build_table_ms']:>15.1f}  {row['build_table_warm_ms']:>8.1f}  "
              f"{row['build_dicts_ms']:>15.1f}  "
              f"{row['encode_ms']:>10.1f}  {len(built)}")  # fmt: skip
    write_results("routing", results)


if __name__ == "__main__":
    main()
