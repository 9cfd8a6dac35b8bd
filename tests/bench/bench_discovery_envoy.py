"""Envoy's memory with discovery: a sidecar that talks to 10 Services, in a small and a large
mesh, scoped (``--scoped``: its namespace and declared dependencies) and not.

A synthetic mesh of ``N`` Services × 10 meshed endpoints; the measured sidecar's namespace holds
10 of them. One real Envoy per case is bootstrapped over ADS to an in-process control plane;
once it is ready, its admin ``/memory`` (heap allocated) is read.

    .venv/bin/python tests/bench/bench_discovery_envoy.py [--sizes 50,5000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
REPO = TESTS.parent
sys.path.insert(0, str(REPO))

from tests.bench.bench_discovery import client_pod, synthetic_mesh  # noqa: E402
from tests.bench.results import write_results  # noqa: E402
from tests.conftest import envoy_binary  # noqa: E402
from tests.support.xds import (  # noqa: E402
    free_ports,
    make_ca,
    run_control_plane,
    run_envoy,
    workload_cert,
)
from webhook.dataplane.ads_bootstrap import XdsOptions  # noqa: E402
from webhook.dataplane.bootstrap import BootstrapOptions  # noqa: E402
from webhook.discovery.core import DiscoverySettings  # noqa: E402
from webhook.discovery.store import ObjectStore  # noqa: E402


def measure(size: int, scoped: bool, tmp: Path) -> dict[str, float]:
    store = ObjectStore()
    # Services spread over 20 namespaces; the client, alone in its namespace, declares the 10
    # it calls (sidemesh.io/dependencies).
    synthetic_mesh(store, size, 10, 1, depends=10)
    client = store.get("Pod", "bench", client_pod(0))
    assert client is not None and "sidemesh.io/dependencies" in client["metadata"]["annotations"]
    ca = make_ca(tmp / "ca")
    certs = workload_cert(ca, "spiffe://cluster.local/ns/bench/sa/client", tmp / "certs")
    ports = free_ports()
    settings = DiscoverySettings(ports=ports, work_dir=str(tmp / "work"), scoped=scoped)
    with run_control_plane(store, settings, tmp / "ca", start_timeout=900) as cp:
        opts = BootstrapOptions(client_pod(0), "bench", "client", cert_dir=str(certs), ports=ports)
        xds = XdsOptions(cp.address, initial_fetch_timeout_s=120)
        with run_envoy(envoy_binary(), opts, xds, tmp / "work") as envoy:
            envoy.wait(lambda: envoy.get("/ready")[0] == 200, "Envoy ready", timeout=300)
            memory = json.loads(envoy.get("/memory")[1])
            stats = envoy.get("/stats?filter=^cluster_manager.active_clusters$")[1]
            clusters = int(stats.split(":")[1])
    return {
        "allocated_mib": round(int(memory["allocated"]) / 2**20, 1),
        "heap_mib": round(int(memory["heap_size"]) / 2**20, 1),
        "clusters": clusters,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50,5000")
    parser.add_argument("--modes", default="scoped,unscoped")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    modes = [m == "scoped" for m in args.modes.split(",")]
    results = {}
    for size in sizes:
        for scoped in modes:
            with tempfile.TemporaryDirectory() as tmp:
                key = f"{size} services, {'scoped' if scoped else 'unscoped'}"
                results[key] = measure(size, scoped, Path(tmp))
                print(key, results[key], flush=True)
    write_results("discovery_envoy", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
