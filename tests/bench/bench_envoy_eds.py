"""What one endpoint change costs a real Envoy: instructions per EDS update, under callgrind.

The change → ACK benchmarks time a fleet of Envoys on two shared cores, where each Envoy's own
work on an update is a large share of the wall time. This one counts it exactly: one Envoy 1.40
(``--concurrency 1``) runs under valgrind's callgrind, bootstrapped over delta ADS and mTLS to an
in-process control plane with the synthetic mesh of ``bench_discovery.py``; one EndpointSlice of
a Service it calls is edited ``--changes`` times (an endpoint added, then removed), and the
instructions Envoy executed meanwhile, less its idle rate (timers), are divided by the changes.
User space only: the kernel's share (socket reads and writes) is not in it. Unlike CPU time it
does not move with the machine's load.

Variants (``--variants``): ``compiled``, the endpoints as the control plane builds them;
``bare``, the same endpoints without any metadata (no auto-mTLS, no telemetry labels), the
floor an EDS update costs Envoy.

    .venv/bin/python tests/bench/bench_envoy_eds.py [--services 1000] [--changes 40]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

from tests.bench.bench_discovery import (  # noqa: E402
    _all_acked,
    client_pod,
    measure_changes,
    synthetic_mesh,
)
from tests.bench.bench_discovery_fleet import client_identity, fixed_ports  # noqa: E402
from tests.bench.results import write_results  # noqa: E402
from tests.conftest import envoy_binary  # noqa: E402
from tests.support.xds import run_control_plane, run_envoy  # noqa: E402
from webhook.config import Ports  # noqa: E402
from webhook.dataplane.ads_bootstrap import XdsOptions  # noqa: E402
from webhook.dataplane.bootstrap import BootstrapOptions  # noqa: E402
from webhook.discovery import shared  # noqa: E402
from webhook.discovery.compiler import CLUSTER, ENDPOINTS, LISTENER  # noqa: E402
from webhook.discovery.core import DiscoverySettings  # noqa: E402
from webhook.discovery.store import ObjectStore  # noqa: E402

IDLE_SECONDS = 10.0  # two of Envoy's 5 s stats flushes: they land in either window
_BUILD = "build_endpoints"


def _bare(build: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    def without_metadata(name: str, endpoints: Any) -> dict[str, Any]:
        out = build(name, endpoints)
        for locality in out["endpoints"]:
            for entry in locality["lb_endpoints"]:
                entry.pop("metadata", None)
        return out

    return without_metadata


@contextmanager
def _variant(name: str) -> Iterator[None]:
    # The push engine builds each Service's endpoints with the function it imported.
    original = getattr(shared, _BUILD)
    if name == "bare":
        setattr(shared, _BUILD, _bare(original))
    try:
        yield
    finally:
        setattr(shared, _BUILD, original)


def _total(dump: Path) -> int:
    found = re.search(r"^(?:summary|totals): (\d+)", dump.read_text(), re.M)
    assert found, f"no instruction total in {dump}"
    return int(found.group(1))


def _callgrind(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def measure(variant: str, services: int, changes: int, tmp: Path) -> dict[str, float]:
    store = ObjectStore()
    synthetic_mesh(store, services, 10, 1)
    ports_left = fixed_ports(6, start=21000)
    capture = Ports(outbound=next(ports_left), inbound=next(ports_left))
    certs, shared_dir = client_identity(tmp, capture)
    out = tmp / "callgrind.out"
    wrapper = tmp / "envoy-under-callgrind"
    wrapper.write_text(f"#!/bin/sh\nexec valgrind --tool=callgrind --callgrind-out-file={out} "
                       f"{envoy_binary()} \"$@\"\n")  # fmt: skip
    wrapper.chmod(0o755)
    settings = DiscoverySettings(ports=capture, scoped=True, work_dir=str(shared_dir))
    with _variant(variant), run_control_plane(store, settings, tmp / "ca", start_timeout=900) as cp:
        xds = XdsOptions(cp.address, initial_fetch_timeout_s=300)
        ports = Ports(capture.outbound, capture.inbound, *(next(ports_left) for _ in range(4)))
        opts = BootstrapOptions(client_pod(0), "bench", "client", cert_dir=str(certs),
                                ports=ports)  # fmt: skip
        (tmp / "envoy").mkdir()
        with run_envoy(str(wrapper), opts, xds, tmp / "envoy") as envoy:
            deadline = time.monotonic() + 600  # Envoy starts slowly under valgrind
            while not _all_acked(cp, (CLUSTER, ENDPOINTS, LISTENER), 1):
                assert envoy.proc.poll() is None, envoy.log.read_text()[-2000:]
                assert time.monotonic() < deadline, "Envoy never ACKed its first config"
                time.sleep(0.5)
            time.sleep(2.0)
            pid = envoy.proc.pid
            _callgrind(pid, "--zero")
            time.sleep(IDLE_SECONDS)
            _callgrind(pid, "--dump=idle")
            _callgrind(pid, "--zero")
            started = time.monotonic()
            measure_changes(cp, store, changes, 1)
            busy = time.monotonic() - started
            _callgrind(pid, "--dump=changes")
    idle, changed = (_total(d) for d in sorted(tmp.glob("callgrind.out.*")))
    per_change = (changed - idle / IDLE_SECONDS * busy) / changes
    idle_rate = round(idle / IDLE_SECONDS)
    return {"instructions_per_change": round(per_change), "idle_per_second": idle_rate}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=40)
    parser.add_argument("--variants", default="compiled,bare")
    args = parser.parse_args()
    if shutil.which("callgrind_control") is None:
        print("bench_envoy_eds: needs valgrind (apt-get install -y valgrind); skipped")
        return 0
    results: dict[str, Any] = {"services": args.services, "changes": args.changes}
    for variant in args.variants.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            results[variant] = measure(variant, args.services, args.changes, Path(tmp))
        print(f"{variant:<10} {results[variant]['instructions_per_change']:>12,} "
              "instructions per endpoint change (idle subtracted)", flush=True)  # fmt: skip
    write_results("envoy_eds", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
