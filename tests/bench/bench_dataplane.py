"""Data-plane benchmark: client pod → server pod through both sidecars (mTLS) vs. directly.

Builds the same namespaces as the end-to-end test (webhook → patch → init → agent → CA → Envoy),
then runs ``wrk`` inside the client pod as the app's uid against the server pod's IP:port:
first through the mesh, then with the capture rules removed from both pods
(``sidemesh init-traffic --cleanup``), in the same run. One and eight connections, keep-alive.
Also: CPU per request of each Envoy (utime + stime over the run / requests) and each Envoy's
PSS. Root, Envoy and wrk required. ``BENCH_SECONDS`` (default 5) sets each run's length.

    .venv/bin/python tests/bench/bench_dataplane.py     # table on stdout,
                                                        # JSON in bench-results/dataplane.json
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from tests.bench.results import write_results  # noqa: E402
from tests.support.meshlab import (  # noqa: E402
    APP_UID,
    SIDEMESH,
    app,
    envoy_pids,
    is_direct,
    start_mesh,
)
from tests.support.netns import Netns, NetnsLab  # noqa: E402

SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
GOALS = {"added_p50_ms_1conn": 0.3, "ratio_8conn": 0.45, "pss_mib": 45.0}
_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not m:
        raise ValueError(f"cannot read wrk latency {text!r}")
    return float(m.group(1)) * _UNIT[m.group(2)]


def wrk(ns: Netns, url: str, connections: int, seconds: int) -> dict[str, float]:
    threads = min(connections, 2)
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    out = ns.run(argv, uid=APP_UID, gid=APP_UID, timeout=seconds + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    return {
        "rps": rps,
        "requests": total,
        "p50_ms": _ms(lat["50"]),
        "p99_ms": _ms(lat["99"]),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(map(int, socket_errors.groups())) if socket_errors else 0,
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no Pss for pid {pid}")


def run() -> dict[str, Any]:
    lab = NetnsLab("smdpb")
    try:
        mesh = start_mesh(lab)
        client, server = mesh.client, mesh.server
        url = f"http://{server.pod_net.ip}:8080/"
        envoys = {"client": envoy_pids(client.ns)[0], "server": envoy_pids(server.ns)[0]}
        assert not is_direct(app(client.ns, "get", server.pod_net.ip, "8080", "/"))
        wrk(client.ns, url, 8, 1)  # warm-up: connections, TLS sessions, caches
        results: dict[str, Any] = {"seconds_per_run": SECONDS, "mesh": {}, "direct": {}}
        for conns in (1, 8):
            before = {k: cpu_seconds(p) for k, p in envoys.items()}
            r = wrk(client.ns, url, conns, SECONDS)
            for k, p in envoys.items():
                r[f"cpu_us_per_req_{k}_envoy"] = (cpu_seconds(p) - before[k]) / r["requests"] * 1e6
            results["mesh"][conns] = r
        results["pss_mib"] = {k: pss_mib(p) for k, p in envoys.items()}
        for pod in (client, server):
            pod.ns.run([*SIDEMESH, "init-traffic", "--cleanup"])
        assert is_direct(app(client.ns, "get", server.pod_net.ip, "8080", "/"))
        for conns in (1, 8):
            results["direct"][conns] = wrk(client.ns, url, conns, SECONDS)
        return results
    finally:
        lab.close(raise_errors=False)


def report(results: dict[str, Any]) -> dict[str, Any]:
    mesh, direct = results["mesh"], results["direct"]
    print(f"data plane, wrk keep-alive, {results['seconds_per_run']} s per run (shared 2-core box)")
    print(f"{'path':<8}{'conns':>6}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'cpu us/req c|s':>18}")
    for name, table in (("mesh", mesh), ("direct", direct)):
        for conns, r in table.items():
            cpu = ""
            if name == "mesh":
                c, s = r["cpu_us_per_req_client_envoy"], r["cpu_us_per_req_server_envoy"]
                cpu = f"{c:.0f} | {s:.0f}"
            print(
                f"{name:<8}{conns:>6}{r['rps']:>10.0f}{r['p50_ms']:>9.3f}{r['p99_ms']:>9.3f}{cpu:>18}"
            )
    added = mesh[1]["p50_ms"] - direct[1]["p50_ms"]
    ratio = mesh[8]["rps"] / direct[8]["rps"]
    pss = max(results["pss_mib"].values())
    summary = {
        "added_p50_ms_1conn": round(added, 3),
        "ratio_8conn": round(ratio, 3),
        "pss_mib": round(pss, 1),
    }
    print(
        f"added p50 at 1 conn: {added:.3f} ms (goal ≤ {GOALS['added_p50_ms_1conn']}); "
        f"mesh/direct at 8 conns: {ratio:.2f}× (goal ≥ {GOALS['ratio_8conn']}); "
        f"PSS per Envoy: {', '.join(f'{k} {v:.1f}' for k, v in results['pss_mib'].items())} MiB "
        f"(goal ≤ {GOALS['pss_mib']:.0f})"
    )
    results["summary"] = summary
    results["goals"] = GOALS
    return results


def main() -> int:
    if os.geteuid() != 0 or shutil.which("wrk") is None:
        print("bench_dataplane: needs root and wrk (apt-get install -y wrk); skipped")
        return 0
    started = time.monotonic()
    results = report(run())
    results["wall_seconds"] = round(time.monotonic() - started, 1)
    write_results("dataplane", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
