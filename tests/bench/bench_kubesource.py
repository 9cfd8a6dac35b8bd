"""The Kubernetes source: first sync of a cluster, event throughput, and what slimming saves.

Against the API-server stand-in on 127.0.0.1 (HTTPS, the official client, paged lists of 500):

* **sync**: ``start()`` → every kind listed into the store, for ``--pods`` Pods (one Service and
  one EndpointSlice per 10 Pods, 20 Namespaces);
* **events**: ``--events`` Pod updates written to the stand-in → all applied to the store;
* **memory**: Python heap (tracemalloc) of the store holding every Pod as the API server sends
  it vs slimmed (what the source keeps).

The stand-in runs in this process and shares its two cores: the figures include its cost.

    .venv/bin/python tests/bench/bench_kubesource.py [--pods 5000] [--events 2000]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent.parent
REPO = TESTS.parent
sys.path.insert(0, str(REPO))

from tests.bench.results import write_results  # noqa: E402
from tests.support.apiserver_standin import APIServerStandin  # noqa: E402
from tests.support.jwks_issuer import Issuer  # noqa: E402
from webhook.discovery.kubesource import KubeSource  # noqa: E402
from webhook.discovery.slim import slim  # noqa: E402
from webhook.discovery.store import ObjectStore  # noqa: E402
from webhook.kube.client import KubeClient  # noqa: E402


def realistic_pod(i: int) -> dict[str, Any]:
    """An injected Deployment pod roughly as big as the API server sends one (~6 KiB JSON)."""
    ns = f"team-{i % 20}"
    ip = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
    env = [{"name": f"SETTING_{k}", "value": "x" * 24} for k in range(12)]
    container = {
        "name": "app",
        "image": "registry.example/team/app:1.2.3",
        "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}],
        "env": env,
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
        "readinessProbe": {"httpGet": {"path": "/app-health/app/readyz", "port": 15020}},
        "volumeMounts": [{"name": "kube-api-access", "mountPath": "/var/run/secrets/x"}],
    }
    proxy = copy.deepcopy(container) | {"name": "sidemesh-proxy", "restartPolicy": "Always"}
    return {
        "kind": "Pod",
        "metadata": {
            "name": f"app-{i}",
            "namespace": ns,
            "labels": {"app": f"svc-{i // 10}", "pod-template-hash": "5d8f7c9b6"},
            "annotations": {
                "sidemesh.io/status": '{"version":"0.1.0","initContainers":["sidemesh-init"]}',
                "sidemesh.io/trust-bundle": "-----BEGIN CERTIFICATE-----\n" + "A" * 700,
                "kubectl.kubernetes.io/restartedAt": "2026-11-28T08:00:00Z",
            },
            "ownerReferences": [{"kind": "ReplicaSet", "name": "app-5d8f7c9b6", "uid": "u"}],
            "managedFields": [
                {"manager": "kube-controller-manager", "fieldsV1": {"f:spec": {"x" * 40: {}}}},
                {"manager": "kubelet", "fieldsV1": {"f:status": {"y" * 40: {}}}},
            ]
            * 3,
        },
        "spec": {
            "serviceAccountName": f"sa-{i // 10}",
            "nodeName": f"node-{i % 50}",
            "initContainers": [copy.deepcopy(proxy)],
            "containers": [container],
            "volumes": [{"name": "kube-api-access", "projected": {"sources": []}}],
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "hostIP": "192.168.0.1",
            "conditions": [{"type": t, "status": "True"} for t in ("Ready", "Initialized")],
            "containerStatuses": [{"name": "app", "ready": True, "restartCount": 0}],
        },
    }


def populate(api: APIServerStandin, pods: int) -> None:
    for n in range(20):
        api.objects.add({"kind": "Namespace", "metadata": {"name": f"team-{n}"}})
    for s in range(pods // 10):
        ns = f"team-{(s * 10) % 20}"
        api.objects.add(
            {
                "kind": "Service",
                "metadata": {"name": f"svc-{s}", "namespace": ns},
                "spec": {"clusterIP": f"10.96.{s >> 8}.{s & 255}", "ports": [{"port": 80}]},
            }
        )
        api.objects.add(
            {
                "kind": "EndpointSlice",
                "metadata": {"name": f"svc-{s}-x", "namespace": ns},
                "addressType": "IPv4",
                "endpoints": [{"addresses": [f"10.1.0.{k}"]} for k in range(10)],
                "ports": [{"port": 8080}],
            }
        )
    for i in range(pods):
        api.objects.add(realistic_pod(i))


def heap_of(objs: list[dict[str, Any]]) -> int:
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    store = ObjectStore()
    store.replace("Pod", [json.loads(json.dumps(o)) for o in objs])
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del store
    return after - before


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=5000)
    ap.add_argument("--events", type=int, default=2000)
    args = ap.parse_args()
    results: dict[str, Any] = {"pods": args.pods}
    with tempfile.TemporaryDirectory() as tmp, APIServerStandin(Path(tmp), Issuer.create()) as api:
        populate(api, args.pods)
        store = ObjectStore()
        source = KubeSource(
            KubeClient.at(api.url, token=api.caller_token, ca_file=str(api.ca_file)), store
        )
        KubeClient.at(api.url)  # import the client before the clock starts
        t0 = time.perf_counter()
        source.start()
        assert source.wait(source.synced, 600)
        results["sync_seconds"] = round(time.perf_counter() - t0, 3)
        assert len(store.list("Pod")) == args.pods
        api.objects.wait_for_watches(4)

        done = threading.Event()
        target = f"v{args.events - 1}"

        def check(_keys: object) -> None:
            pod = store.get("Pod", "team-0", "app-0")
            if pod is not None and pod["metadata"].get("labels", {}).get("v") == target:
                done.set()

        store.subscribe(check)
        base = realistic_pod(0)
        t0 = time.perf_counter()
        for e in range(args.events):
            pod = copy.deepcopy(base)
            pod["metadata"]["labels"]["v"] = f"v{e}"
            api.objects.modify(pod)
        assert done.wait(600)
        elapsed = time.perf_counter() - t0
        results["events_per_second"] = round(args.events / elapsed)
        source.stop()

    raw = [realistic_pod(i) for i in range(min(args.pods, 2000))]
    full, slimmed = heap_of(raw), heap_of([slim("Pod", p, "v1") for p in raw])
    results["heap_bytes_per_pod_full"] = full // len(raw)
    results["heap_bytes_per_pod_slim"] = slimmed // len(raw)
    results["json_bytes_per_pod_full"] = len(json.dumps(raw[0]))
    print(json.dumps(results, indent=2))
    write_results("kubesource", results)


if __name__ == "__main__":
    main()
