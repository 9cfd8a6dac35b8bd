"""Endpoint change → ACK with real Envoys: a fleet of sidecars on one control plane.

The same synthetic mesh as ``bench_discovery.py`` (``--services`` Services × ``--endpoints``
meshed endpoints) is loaded into an in-process control plane (the real push engine and grpcio
ADS server over mTLS). ``--envoys`` real Envoys (``--concurrency 1``), each a replica of the
client Deployment with its own workload certificate, admin and stats ports, are bootstrapped
over delta ADS to it. They share the capture listener ports, as sidecars in different pods
would (Envoy binds them with SO_REUSEPORT).

Once every Envoy has ACKed its first clusters, endpoints and listeners, one EndpointSlice of a
Service every client calls is edited ``--changes`` times (an endpoint added, then removed); each
time, the span from the store edit to the moment the control plane has handed the new set to
every stream, and to the moment the last Envoy's ACK of it is read. Envoy's own ACK is what
counts here, not a simulated client's. Also the CPU one change costs the control plane and all
the Envoys together (their idle timers subtracted): on two shared cores the wall time to the
last ACK cannot be below about half their sum. Before that, the control plane's CPU per proxy to
send every Envoy its whole config again (gRPC and TLS included, the stream's set-up not).

    .venv/bin/python tests/bench/bench_discovery_fleet.py [--envoys 100] [--scoped]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent.parent
REPO = TESTS.parent
sys.path.insert(0, str(REPO))

from tests.bench.bench_discovery import (  # noqa: E402
    _all_acked,
    client_pod,
    full_repush_cpu_ms,
    measure_changes,
    percentile,
    synthetic_mesh,
)
from tests.bench.results import write_results  # noqa: E402
from tests.conftest import envoy_binary  # noqa: E402
from tests.support.xds import (  # noqa: E402
    Envoy,
    make_ca,
    run_control_plane,
    run_envoy,
    workload_cert,
)
from webhook.config import Ports  # noqa: E402
from webhook.dataplane.ads_bootstrap import XdsOptions  # noqa: E402
from webhook.dataplane.bootstrap import BootstrapOptions, render_sds  # noqa: E402
from webhook.discovery.compiler import CLUSTER, ENDPOINTS, LISTENER  # noqa: E402
from webhook.discovery.core import DiscoverySettings  # noqa: E402
from webhook.discovery.store import ObjectStore  # noqa: E402


def fixed_ports(count: int, start: int = 20000) -> Iterator[int]:
    """Ports below the ephemeral range that nothing listens on now: a port picked from the
    ephemeral range can be taken by an outgoing connection before the hundredth Envoy binds it."""
    found = 0
    for port in range(start, 32768):
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
        found += 1
        yield port
        if found == count:
            return
    raise RuntimeError(f"fewer than {count} free ports from {start}")


def _envoy_rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


def _ready(envoy: Envoy) -> bool:
    return envoy.get("/ready")[0] == 200


def _cpu_ms(pids: list[int]) -> float:
    """utime + stime of ``pids``, in ms."""
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks * 1000 / os.sysconf("SC_CLK_TCK")


def _nacks(cp: Any) -> list[str]:
    return [f"{c.node_id}: {ts.last_nack}" for c in cp.discovery.proxies.values()
            for ts in c.types.values() if ts.nacks]  # fmt: skip


def _ms(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(percentile(values, 0.5) * 1000, 1),
        "p99": round(percentile(values, 0.99) * 1000, 1),
        "max": round(max(values) * 1000, 1),
    }


def client_identity(tmp: Path, capture: Ports) -> tuple[Path, Path]:
    """A mesh CA under ``tmp``, the client workload's certificate, and the SDS directory the
    listeners name: every replica has the same identity, so they share it. Returns (the
    certificate directory, the shared work directory)."""
    ca = make_ca(tmp / "ca")
    certs = workload_cert(ca, "spiffe://cluster.local/ns/bench/sa/client", tmp / "client")
    shared = tmp / "shared"
    (shared / "sds").mkdir(parents=True)
    sds_opts = BootstrapOptions("client", "bench", "client", cert_dir=str(certs), ports=capture,
                                work_dir=str(shared))  # fmt: skip
    for name, content in render_sds(sds_opts).items():
        (shared / "sds" / name).write_text(json.dumps(content))
    return certs, shared


def run(args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    store = ObjectStore()
    synthetic_mesh(store, args.services, args.endpoints, args.envoys)
    ports_left = fixed_ports(2 + 4 * args.envoys)
    capture = Ports(outbound=next(ports_left), inbound=next(ports_left))
    certs, shared = client_identity(tmp, capture)
    settings = DiscoverySettings(ports=capture, scoped=args.scoped, work_dir=str(shared))
    with run_control_plane(store, settings, tmp / "ca", start_timeout=900) as cp, ExitStack() as st:
        xds = XdsOptions(cp.address, initial_fetch_timeout_s=120)
        envoys = []
        t0 = time.perf_counter()
        for i in range(args.envoys):
            ports = Ports(capture.outbound, capture.inbound, *(next(ports_left) for _ in range(4)))
            opts = BootstrapOptions(client_pod(i), "bench", "client", cert_dir=str(certs),
                                    ports=ports)  # fmt: skip
            work = tmp / f"envoy-{i}"
            work.mkdir()
            envoys.append(st.enter_context(run_envoy(envoy_binary(), opts, xds, work)))
        deadline = time.monotonic() + 900
        while not _all_acked(cp, (CLUSTER, ENDPOINTS, LISTENER), args.envoys):
            for envoy in envoys:
                if envoy.proc.poll() is not None:
                    raise RuntimeError(f"an Envoy exited: {envoy.log.read_text()[-2000:]}")
            if cp.call(lambda: _nacks(cp)):
                raise RuntimeError(f"an Envoy rejected its config: {cp.call(lambda: _nacks(cp))}")
            if time.monotonic() > deadline:
                raise TimeoutError("the Envoys never all ACKed their first config")
            time.sleep(0.2)
        started = time.perf_counter() - t0
        for envoy in envoys:
            envoy.wait(partial(_ready, envoy), "Envoy ready", timeout=120)
        nacks = cp.call(lambda: len(_nacks(cp)))
        rss = _envoy_rss_mib([e.proc.pid for e in envoys])
        repush = full_repush_cpu_ms(cp, args.envoys)
        pids = [e.proc.pid for e in envoys]
        idle = _cpu_ms(pids)
        time.sleep(2.0)
        idle_rate = (_cpu_ms(pids) - idle) / 2.0  # timers, stats flushes: not the changes
        envoy0, cp0, t0 = _cpu_ms(pids), time.process_time(), time.perf_counter()
        sent, acked = measure_changes(cp, store, args.changes, args.envoys)
        elapsed = time.perf_counter() - t0
        envoy_cpu = (_cpu_ms(pids) - envoy0 - idle_rate * elapsed) / args.changes
        cp_cpu = (time.process_time() - cp0) * 1000 / args.changes
    return {
        "envoys": args.envoys,
        "scoped": args.scoped,
        "services": args.services,
        "endpoints_per_service": args.endpoints,
        "fleet_ready_s": round(started, 1),
        "nacks": nacks,
        "envoy_rss_mib_total": round(rss),
        "full_repush_cpu_ms_per_proxy": round(repush, 2),
        "per_change_cpu_ms": {"control_plane": round(cp_cpu, 1), "all_envoys": round(envoy_cpu, 1)},
        "change_to_all_sent_ms": _ms(sent),
        "change_to_all_acked_ms": _ms(acked),
        "load_average": os.getloadavg()[0],
    }


INOTIFY = Path("/proc/sys/fs/inotify/max_user_instances")


@contextmanager
def inotify_instances(envoys: int) -> Iterator[None]:
    """Each Envoy watches its certificate files with a few inotify instances; the usual limit
    (128 per user) stops a fleet at a dozen. Raised for the run when needed, restored after."""
    wanted = 128 + 10 * envoys
    old = int(INOTIFY.read_text())
    if old >= wanted:
        yield
        return
    print(f"raising fs.inotify.max_user_instances {old} -> {wanted} for this run", flush=True)
    try:
        INOTIFY.write_text(str(wanted))
    except OSError as exc:
        raise SystemExit(
            f"{envoys} Envoys need fs.inotify.max_user_instances >= {wanted} (it is {old}) and it "
            f"cannot be raised here ({exc.strerror}): run as root, or raise it first"
        ) from None
    try:
        yield
    finally:
        INOTIFY.write_text(str(old))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envoys", type=int, default=100)
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--changes", type=int, default=40)
    parser.add_argument("--scoped", action="store_true", help="scope each sidecar")
    args = parser.parse_args()
    # SIGTERM unwinds like ^C, so every Envoy started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    with inotify_instances(args.envoys), tempfile.TemporaryDirectory() as tmp:
        result = run(args, Path(tmp))
    print(json.dumps(result, indent=1))
    write_results("discovery_fleet-scoped" if args.scoped else "discovery_fleet", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
