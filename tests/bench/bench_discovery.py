"""The control plane under load: endpoint change → ACK by every proxy, CPU per full push, RSS.

A synthetic mesh (``--services`` Services × ``--endpoints`` meshed endpoints each) is loaded
into the store of an in-process control plane (the real push engine and grpcio ADS server over
mTLS). ``--proxies`` simulated sidecars connect from ``--procs`` client processes, each an
asyncio loop of delta ADS streams that subscribe like Envoy (CDS and LDS wildcard, EDS for every
cluster they got) and ACK every response at once.

Figures:

* full push: control-plane CPU (process time) per proxy from its stream's start to its ACK of
  the initial clusters, endpoints and listeners — the first proxy alone (it also pays for the
  resources every proxy shares: the encoded listener), then the rest together, per proxy
  (gRPC, TLS and the stream included); and the push engine alone, in-process without a
  network, per proxy (up to 100 proxies);
* full re-push: control-plane CPU per proxy to send every open stream its whole config again
  and read the ACKs (gRPC and TLS included, the stream's set-up not);
* change → ACK: one EndpointSlice is edited (an endpoint added, then removed) ``--changes``
  times; each time, the span from the store edit to the last proxy's ACK of that endpoint set;
  and the control plane's CPU per change (its idle rate subtracted): the push engine, gRPC,
  TLS and reading the ACKs;
* RSS of the control plane with every stream open.

Each simulated sidecar also asks for its routes (RDS), and declares 10 Services it calls:
with ``--scoped`` that is all it gets besides its own namespace. The sidecars are replicas of
one Deployment, or of ``--workloads`` different workloads.

    .venv/bin/python tests/bench/bench_discovery.py [--proxies 100] [--services 1000] [--scoped]
                                                    [--workloads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent.parent
REPO = TESTS.parent
sys.path.insert(0, str(REPO))

from tests.bench.results import write_results  # noqa: E402
from tests.support.xds import make_ca, run_control_plane, workload_cert  # noqa: E402
from webhook.discovery.compiler import CLUSTER, ENDPOINTS, LISTENER, ROUTE  # noqa: E402
from webhook.discovery.core import DiscoverySettings  # noqa: E402
from webhook.discovery.store import ObjectStore  # noqa: E402

STATUS = {"sidemesh.io/status": '{"version":"bench"}'}


def synthetic_mesh(
    store: ObjectStore,
    services: int,
    endpoints: int,
    proxies: int,
    depends: int = 10,
    workloads: int = 1,
) -> None:
    """Each client pod declares the first ``depends`` Services (what it gets when scoped);
    the client pods belong to ``workloads`` workloads (round robin)."""
    deps = ",".join(f"ns{s % 20}/svc{s}" for s in range(min(depends, services)))
    pods, slices, svcs = [], [], []
    for s in range(services):
        ns = f"ns{s % 20}"
        name = f"svc{s}"
        svcs.append(
            {
                "kind": "Service",
                "metadata": {"name": name, "namespace": ns},
                "spec": {
                    "clusterIP": f"10.96.{s // 250}.{s % 250 + 1}",
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
                },
            }
        )
        eps = []
        for e in range(endpoints):
            n = s * endpoints + e
            ip = f"10.{100 + n // 65000}.{(n // 250) % 260 % 256}.{n % 250 + 1}"
            pods.append(
                {
                    "kind": "Pod",
                    "metadata": {"name": f"{name}-{e}", "namespace": ns, "annotations": STATUS},
                    "spec": {"serviceAccountName": name},
                    "status": {"phase": "Running", "podIP": ip},
                }
            )
            eps.append(
                {
                    "addresses": [ip],
                    "conditions": {"ready": True},
                    "targetRef": {"kind": "Pod", "name": f"{name}-{e}"},
                }
            )
        slices.append(
            {
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"{name}-1",
                    "namespace": ns,
                    "labels": {"kubernetes.io/service-name": name},
                },
                "ports": [{"name": "http", "port": 8080}],
                "endpoints": eps,
            }
        )
    for p in range(proxies):
        # Replicas of one Deployment, or each pod in one of ``workloads`` apps.
        labels = {"app": "client", "pod-template-hash": "5d4f7"}
        if workloads > 1:
            labels = {"app": f"client-{p % workloads}"}
        pods.append(
            {
                "kind": "Pod",
                "metadata": {
                    "name": client_pod(p),
                    "namespace": "bench",
                    "labels": labels,
                    "annotations": {**STATUS, "sidemesh.io/dependencies": deps},
                },
                "spec": {"serviceAccountName": "client"},
                "status": {"phase": "Running", "podIP": f"10.250.{p // 250}.{p % 250 + 1}"},
            }
        )
    store.replace("Service", svcs)
    store.replace("EndpointSlice", slices)
    store.replace("Pod", pods)  # fmt: skip


def client_pod(i: int) -> str:
    return f"client-5d4f7-{i:05d}"


# --- simulated proxies (in client processes) --------------------------------------------


async def _proxy(stub: Any, pb: Any, node_id: str, ready: Any) -> None:
    queue: asyncio.Queue[Any] = asyncio.Queue()
    first = pb.DeltaDiscoveryRequest(type_url=CLUSTER)
    first.node.id = node_id
    await queue.put(first)
    await queue.put(pb.DeltaDiscoveryRequest(type_url=LISTENER))

    async def requests() -> Any:
        while True:
            item = await queue.get()
            if item is None:
                return
            yield item

    got: set[str] = set()
    eds_started = rds_started = False
    async for resp in stub.DeltaAggregatedResources(requests()):
        got.add(resp.type_url)
        await queue.put(pb.DeltaDiscoveryRequest(type_url=resp.type_url, response_nonce=resp.nonce))
        names = [r.name for r in resp.resources if r.name.startswith("outbound|")]
        if resp.type_url == CLUSTER and not eds_started:
            eds_started = True
            await queue.put(
                pb.DeltaDiscoveryRequest(type_url=ENDPOINTS, resource_names_subscribe=names)
            )
            # Envoy asks for the routes its listener's HTTP chains name: one per Service port.
            rds_started = True
            await queue.put(
                pb.DeltaDiscoveryRequest(type_url=ROUTE, resource_names_subscribe=names)
            )
        if got >= {CLUSTER, ENDPOINTS, LISTENER} and rds_started and not ready.is_set():
            ready.set()  # fmt: skip


async def _reconnecting(stub: Any, pb: Any, node_id: str) -> None:
    """Like Envoy: a stream that fails (a refused or timed-out connect when thousands start
    at once) is opened again after a pause."""
    import grpc

    while True:
        try:
            await _proxy(stub, pb, node_id, asyncio.Event())
            return
        except grpc.aio.AioRpcError:
            await asyncio.sleep(1.0)


def client_process(address: str, cert_dir: str, first: int, count: int, hold: Any) -> None:
    import grpc
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2 as pb

    async def main() -> None:
        d = Path(cert_dir)
        creds = grpc.ssl_channel_credentials(
            (d / "ca.crt").read_bytes(), (d / "key.pem").read_bytes(), (d / "cert.pem").read_bytes()
        )
        channels, tasks = [], []
        for i in range(first, first + count):
            ch = grpc.aio.secure_channel(address, creds, options=[
                ("grpc.ssl_target_name_override", "localhost"),
                ("grpc.max_receive_message_length", 256 << 20)])  # fmt: skip
            channels.append(ch)
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch)
            node_id = f"sidecar~{client_pod(i)}.bench"
            tasks.append(asyncio.ensure_future(_reconnecting(stub, pb, node_id)))
        while not hold.is_set():
            await asyncio.sleep(0.2)
        for t in tasks:
            t.cancel()
        for ch in channels:
            await ch.close()

    asyncio.run(main())


# --- the measurement ------------------------------------------------------------------------


def _all_acked(cp: Any, type_urls: tuple[str, ...], n: int) -> bool:
    def check() -> bool:
        conns = list(cp.discovery.proxies.values())
        if len(conns) < n:
            return False
        for c in conns:
            for t in type_urls:
                ts = c.types.get(t)
                if ts is None or not ts.sent or ts.pending:
                    return False
        return True

    return bool(cp.call(check, timeout=300))


def _wait_acked(cp: Any, n: int, types: tuple[str, ...] = (CLUSTER, ENDPOINTS, LISTENER)) -> None:
    deadline = time.monotonic() + 600
    while not _all_acked(cp, types, n):
        if time.monotonic() > deadline:
            connected = cp.call(lambda: len(cp.discovery.proxies))
            raise TimeoutError(
                f"the proxies never all ACKed their first config ({n}; {connected} connected)"
            )
        time.sleep(0.05)


def _rss_mib() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def measure_changes(
    cp: Any, store: ObjectStore, changes: int, n: int
) -> tuple[list[float], list[float]]:
    """Edit one EndpointSlice; the spans to the moment the control plane has handed the new set
    to every proxy's stream, and to the moment every proxy has ACKed it."""
    name = "outbound|80||svc0.ns0.svc.cluster.local"
    base = store.get("EndpointSlice", "ns0", "svc0-1")
    assert base is not None
    spans: list[float] = []
    done = threading.Event()
    state: dict[str, Any] = {}
    d = cp.discovery
    original = d.on_request

    def on_request(conn: Any, req: Any) -> None:
        original(conn, req)
        old = state.get("old")
        if old is None or req.type_url != ENDPOINTS:
            return
        ts = conn.types.get(ENDPOINTS)
        if ts.sent.get(name) not in (None, old) and not ts.pending:
            state["acked"].add(conn.conn_id)
            if len(state["acked"]) >= n:
                state["end"] = time.perf_counter()
                state.pop("old")
                done.set()

    original_send = d._send
    sent_spans: list[float] = []

    def send(conn: Any, ts: Any, type_url: str, updates: Any, removed: Any) -> None:
        original_send(conn, ts, type_url, updates, removed)
        if state.get("old") is not None and type_url == ENDPOINTS and name in updates:
            state["sent"].add(conn.conn_id)
            if len(state["sent"]) == n:
                sent_spans.append(time.perf_counter() - state["start"])

    d.on_request = on_request
    d._send = send
    for i in range(changes):
        edited = copy.deepcopy(base)
        if i % 2 == 0:
            edited["endpoints"].append({"addresses": ["10.254.0.1"], "conditions": {"ready": True}})
        done.clear()

        def start(obj: Any = edited) -> None:
            state["acked"] = set()
            state["sent"] = set()
            state["old"] = d.tables[ENDPOINTS].items[name].version
            state["start"] = time.perf_counter()
            store.upsert(obj)  # as a source would: the store tells the engine

        cp.call(start, timeout=300)
        if not done.wait(30):
            raise TimeoutError(f"change {i}: {len(state['acked'])}/{n} proxies ACKed")
        spans.append(state["end"] - state["start"])
        time.sleep(0.05)
    d.on_request = original
    d._send = original_send
    return sent_spans, spans


def full_repush_cpu_ms(cp: Any, n: int) -> float:
    """Control-plane CPU (ms per proxy) to send every connected proxy its whole config again
    and read its ACKs: the push itself with gRPC and TLS, without the stream's set-up."""

    def repush() -> None:
        for conn in cp.discovery.proxies.values():
            for ts in conn.types.values():
                ts.sent = dict.fromkeys(ts.sent, "")  # stale: every resource goes again
            cp.discovery.push(conn, full=True)

    start = time.process_time()
    cp.call(repush, timeout=300)
    _wait_acked(cp, n, (CLUSTER, ENDPOINTS, LISTENER, ROUTE))
    return (time.process_time() - start) * 1000 / n


def percentile(values: list[float], p: float) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p * len(ordered)) - 1))]


def engine_cpu_per_push(
    services: int, endpoints: int, proxies: int, scoped: bool, workloads: int = 1
) -> float:
    """The push engine alone (no gRPC, no TLS): ms of CPU per proxy for a full first push of
    clusters, listeners, endpoints and routes, after a first proxy paid for what they share."""
    from envoy.service.discovery.v3 import discovery_pb2 as pb

    from webhook.discovery.core import Discovery

    async def run() -> float:
        store = ObjectStore()
        synthetic_mesh(store, services, endpoints, proxies, workloads=workloads)
        d = Discovery(store, DiscoverySettings(scoped=scoped))
        d.start(asyncio.get_running_loop())

        def connect(i: int) -> None:
            conn = d.connect("spiffe://cluster.local/ns/bench/sa/client", "bench",
                             client_pod(i), "bench", "n")  # fmt: skip
            d.on_request(conn, pb.DeltaDiscoveryRequest(type_url=CLUSTER))
            d.on_request(conn, pb.DeltaDiscoveryRequest(type_url=LISTENER))
            names = [n for n in conn.types[CLUSTER].sent if n.startswith("outbound|")]
            for type_url in (ENDPOINTS, ROUTE):
                d.on_request(
                    conn,
                    pb.DeltaDiscoveryRequest(type_url=type_url, resource_names_subscribe=names),
                )
            while not conn.queue.empty():
                conn.queue.get_nowait()

        connect(0)
        start = time.process_time()
        for i in range(1, proxies):
            connect(i)
        return (time.process_time() - start) * 1000 / max(1, proxies - 1)

    return asyncio.run(run())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proxies", type=int, default=100)
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--procs", type=int, default=4, help="client processes")
    parser.add_argument("--changes", type=int, default=40)
    parser.add_argument(
        "--scoped", action="store_true", help="scope each sidecar (it declares 10 Services)"
    )
    parser.add_argument("--workloads", type=int, default=1, help="workloads of the sidecars")
    args = parser.parse_args()
    engine = engine_cpu_per_push(
        args.services, args.endpoints, min(args.proxies, 100), args.scoped, args.workloads
    )
    store = ObjectStore()
    t0 = time.perf_counter()
    synthetic_mesh(store, args.services, args.endpoints, args.proxies, workloads=args.workloads)
    with tempfile.TemporaryDirectory() as tmp:
        ca = make_ca(Path(tmp) / "ca")
        workload_cert(ca, "spiffe://cluster.local/ns/bench/sa/client", Path(tmp) / "client")
        settings = DiscoverySettings(scoped=args.scoped)
        with run_control_plane(store, settings, Path(tmp) / "ca") as cp:
            build = time.perf_counter() - t0
            # spawn, not fork: grpc in this process has threads a fork would break.
            ctx = multiprocessing.get_context("spawn")
            hold = ctx.Event()
            client_dir = str(Path(tmp) / "client")
            # The first proxy alone: it pays for what all proxies share (the listener build).
            cpu0 = time.process_time()
            procs = [ctx.Process(target=client_process, args=(cp.address, client_dir, 0, 1, hold))]
            procs[0].start()
            _wait_acked(cp, 1)
            first_cpu = time.process_time() - cpu0
            cpu1 = time.process_time()
            rest = args.proxies - 1
            per = -(-rest // args.procs)
            for k in range(args.procs):
                count = min(per, rest - k * per)
                if count > 0:
                    first = 1 + k * per
                    p = ctx.Process(
                        target=client_process, args=(cp.address, client_dir, first, count, hold)
                    )
                    p.start()
                    procs.append(p)
            _wait_acked(cp, args.proxies)
            full_cpu = time.process_time() - cpu1
            rss = _rss_mib()
            repush = full_repush_cpu_ms(cp, args.proxies)
            idle0 = time.process_time()
            time.sleep(1.0)
            idle_rate = time.process_time() - idle0  # per second: timers, the bench's polling
            cpu0, t_changes = time.process_time(), time.perf_counter()
            sent_spans, spans = measure_changes(cp, store, args.changes, args.proxies)
            elapsed = time.perf_counter() - t_changes
            change_cpu = (time.process_time() - cpu0 - idle_rate * elapsed) / args.changes
            hold.set()
            for p in procs:
                p.join(30)
    spans.sort()

    def rank(p: float) -> float:  # nearest rank
        return spans[min(len(spans) - 1, max(0, round(p * len(spans)) - 1))]

    result = {
        "scoped": args.scoped,
        "proxies": args.proxies,
        "workloads": args.workloads,
        "services": args.services,
        "endpoints_per_service": args.endpoints,
        "initial_build_s": round(build, 2),
        "first_proxy_cpu_ms": round(first_cpu * 1000, 1),
        "full_push_cpu_ms_per_proxy": round(full_cpu * 1000 / max(1, args.proxies - 1), 2),
        "engine_only_full_push_cpu_ms_per_proxy": round(engine, 2),
        "full_repush_cpu_ms_per_proxy": round(repush, 2),
        "control_plane_cpu_ms_per_change": round(change_cpu * 1000, 1),
        "change_to_all_sent_ms": {"p50": round(percentile(sent_spans, 0.5) * 1000, 1),
                                  "p99": round(percentile(sent_spans, 0.99) * 1000, 1)},
        "change_to_all_acked_ms": {"p50": round(rank(0.5) * 1000, 1),
                                   "p99": round(rank(0.99) * 1000, 1),
                                   "max": round(spans[-1] * 1000, 1)},
        "control_plane_rss_mib": round(rss, 1),
        "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    write_results("discovery-scoped" if args.scoped else "discovery", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
