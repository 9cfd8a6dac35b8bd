"""Telemetry cost: the same meshed call with the control plane's telemetry on and off.

Builds the telemetry lab (client → ``web`` Service → web, both meshed, programmed over ADS by
``sidemesh discovery``) and runs ``wrk -c1`` inside the client pod as the app's uid, in rounds
that alternate the mesh config's telemetry, restarting the control plane between rounds so the
sidecars get the other listeners:

* ``off``: ``metrics: false, access_log: off``
* ``on``: the defaults (golden metrics, access log of failures + 1 %)
* ``on+tracing``: the defaults plus traces to the lab's OTLP receiver, 1 % sampled

Per mode: p50 at one connection (median over rounds) and each Envoy's CPU per request
(utime + stime from /proc/PID/stat over the run, divided by the requests).

The lab's figures carry the Python app and both hops' TLS; on a busy machine their noise can
exceed what is measured. So a second part isolates the golden-metrics logger: one Envoy on
loopback answering every request itself (``direct_response``), with and without the stats
logger the control plane compiles for an HTTP chain, same rounds. A third counts the
instructions that Envoy executes per request for each piece, under valgrind's callgrind: a
figure that does not move with the machine's load. Root, Envoy and wrk required (valgrind for
the third part); ``BENCH_SECONDS`` (default 5) per run, ``BENCH_ROUNDS`` (default 3) per mode,
``BENCH_PARTS`` (default ``lab,alone,instructions,lab-instructions``) what to run; the
fourth counts the instructions of the lab's own two sidecars per request, telemetry off and on.

    .venv/bin/python tests/bench/bench_telemetry.py   # table on stdout,
                                                      # JSON in bench-results/telemetry.json
"""

from __future__ import annotations

import contextlib
import copy
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from tests.bench.bench_dataplane import cpu_seconds, wrk  # noqa: E402
from tests.bench.results import write_results  # noqa: E402
from tests.conftest import envoy_binary  # noqa: E402
from tests.support.envoy_alone import direct_response_config  # noqa: E402
from tests.support.meshlab import app, envoy_pids  # noqa: E402
from tests.support.netns import NetnsLab  # noqa: E402
from tests.support.telemetrylab import OTLP_PORT, WEB, start  # noqa: E402
from webhook.config import DEFAULTS, TelemetryConfig  # noqa: E402
from webhook.telemetry.accesslog import json_logger  # noqa: E402
from webhook.telemetry.metrics import HTTP_LABELS, stats_logger  # noqa: E402
from webhook.telemetry.settings import AccessLogPolicy  # noqa: E402
from webhook.telemetry.tracing import collector_cluster, http_tracing  # noqa: E402
from webhook.telemetry.workload import OWN_WORKLOAD  # noqa: E402

SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
INSTRUCTION_REQUESTS = int(os.environ.get("BENCH_INSTRUCTION_REQUESTS", "1000"))
PROXY_UID = DEFAULTS.proxy.uid
GOALS = {"added_cpu_per_request": 0.10, "added_p50_ms": 0.05}


def modes(collector: str) -> dict[str, dict[str, Any]]:
    return {
        "off": {"metrics": False, "access_log": "off"},
        "on": {},
        "on+tracing": {"tracing_collector": collector, "tracing_sampling": 1.0},
    }


def run() -> dict[str, Any]:
    lab = NetnsLab("smtelb")
    try:
        m = start(lab, {"metrics": False, "access_log": "off"}, pod_annotations=False)
        client = m.pod("client").ns
        envoys = {w: envoy_pids(m.pod(w).ns)[0] for w in ("client", "web")}
        url = f"http://{WEB}:80/"
        assert app(client, "hits", WEB, "80", "/", "1")["codes"] == {"200": 1}
        configs = modes(f"{m.cp.ip}:{OTLP_PORT}")
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
        current = "off"
        for _ in range(ROUNDS):
            for name, telemetry in configs.items():
                if name != current:
                    m.restart_discovery(telemetry)
                    current = name
                wrk(client, url, 1, 1)  # warm-up after the listener change
                before = {w: _user_seconds(p) for w, p in envoys.items()}
                before_all = {w: cpu_seconds(p) for w, p in envoys.items()}
                r = wrk(client, url, 1, SECONDS)
                for w, p in envoys.items():
                    n = r["requests"]
                    r[f"cpu_us_per_req_{w}"] = (cpu_seconds(p) - before_all[w]) / n * 1e6
                    r[f"user_us_per_req_{w}"] = (_user_seconds(p) - before[w]) / n * 1e6
                runs[name].append(r)
        return {"seconds_per_run": SECONDS, "rounds": ROUNDS, "runs": runs}
    finally:
        lab.close(raise_errors=False)


def _user_seconds(pid: int) -> float:
    """User-space CPU time of a process (utime): what instruction counts compare with."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / os.sysconf("SC_CLK_TCK")


def _alone_config(
    port: int, admin: int, loggers: list[Any], extra: dict[str, Any]
) -> dict[str, Any]:
    config = direct_response_config(port, admin, loggers, extra)
    if "tracing" in extra:  # a collector nobody listens on: spans are dropped at export
        collector = collector_cluster(TelemetryConfig(tracing_collector="127.0.0.1:19939"))
        config["static_resources"]["clusters"] = [collector]
    return config


def alone_variants() -> dict[str, tuple[list[Any], dict[str, Any]]]:
    """Each piece of the telemetry of a server sidecar's HTTP chain on its own: (access
    loggers, connection manager settings)."""
    labels = {name: f"x-{name}" for name in HTTP_LABELS}  # per-chain values: literals
    labels["reporter"] = "destination"  # so the sidecar's own labels are left to the agent
    labels["source_principal"] = "%DOWNSTREAM_PEER_URI_SAN%"
    labels["source_workload"] = "%FILTER_STATE(sidemesh.peer.workload:PLAIN)%"
    labels["destination_workload"] = OWN_WORKLOAD
    stats = stats_logger("http", labels)
    no_tags = copy.deepcopy(stats)
    for stat in [*no_tags["typed_config"]["counters"], *no_tags["typed_config"]["histograms"]]:
        stat["stat"]["tags"] = []
    access = json_logger("http", labels, AccessLogPolicy(True, 1.0))
    tracing: dict[str, Any] = {}
    http_tracing(TelemetryConfig(tracing_collector="127.0.0.1:19939"), tracing, inbound=True)
    return {
        "off": ([], {}),
        "metrics": ([stats], {}),
        "metrics no labels": ([no_tags], {}),
        "access log 1%": ([access], {}),
        "tracing 1%": ([], tracing),
        "request id only": ([], {"generate_request_id": True}),
    }


def _alone_run(loggers: list[Any], extra: dict[str, Any], tmp: Path) -> dict[str, Any]:
    path = tmp / "envoy.json"
    path.write_text(json.dumps(_alone_config(19931, 19930, loggers, extra)))
    argv = [envoy_binary(), "-c", str(path), "--disable-hot-restart",
            "--concurrency", "1", "-l", "error"]  # fmt: skip
    env = {**os.environ, "SIDEMESH_WORKLOAD": "web"}
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        url = "http://127.0.0.1:19931/"
        deadline = time.monotonic() + 10
        while subprocess.run(["wrk", "-t1", "-c1", "-d1s", url],
                             capture_output=True).returncode != 0:  # fmt: skip
            assert time.monotonic() < deadline, "envoy never listened"
        before = cpu_seconds(proc.pid)
        out = subprocess.run(
            ["wrk", "-t1", "-c1", f"-d{SECONDS}s", "--latency", url],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        used = cpu_seconds(proc.pid) - before
    finally:
        proc.terminate()
        proc.wait()
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"50%\s+(\S+)", out).group(1)  # type: ignore[union-attr]
    return {"cpu_us_per_req": used / total * 1e6, "p50": p50}


def envoy_alone() -> dict[str, Any]:
    """CPU per request of one Envoy with each piece of telemetry alone, rounds interleaved."""
    variants = alone_variants()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(ROUNDS):
            for name, (loggers, extra) in variants.items():
                runs[name].append(_alone_run(loggers, extra, Path(tmp)))
    return runs


def _get(port: int, count: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        for _ in range(count):
            conn.request("GET", "/")
            response = conn.getresponse()
            response.read()
            assert response.status == 200, response.status
    finally:
        conn.close()


def _instructions_run(loggers: list[Any], extra: dict[str, Any], tmp: Path, tag: str) -> float:
    """Instructions one Envoy executes per request, counted by valgrind's callgrind over
    ``INSTRUCTION_REQUESTS`` keep-alive requests after a warm-up (user space only: the
    kernel's share is not in it). Unlike CPU time it does not move with the machine's load."""
    path = tmp / f"envoy-{tag}.json"
    path.write_text(json.dumps(_alone_config(19931, 19930, loggers, extra)))
    out = tmp / f"callgrind-{tag}.out"
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
            envoy_binary(), "-c", str(path), "--disable-hot-restart",
            "--concurrency", "1", "-l", "error"]  # fmt: skip
    env = {**os.environ, "SIDEMESH_WORKLOAD": "web"}
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 240  # Envoy starts slowly under valgrind
        while True:
            try:
                _get(19931, 1)
                break
            except OSError:
                assert time.monotonic() < deadline, "envoy never listened under valgrind"
                time.sleep(1)
        _get(19931, 200)
        subprocess.run(["callgrind_control", "--zero", str(proc.pid)], check=True,
                       capture_output=True)  # fmt: skip
        _get(19931, INSTRUCTION_REQUESTS)
        subprocess.run(["callgrind_control", "--dump", str(proc.pid)], check=True,
                       capture_output=True)  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    (dump,) = tmp.glob(f"callgrind-{tag}.out.*")
    found = re.search(r"^(?:summary|totals): (\d+)", dump.read_text(), re.M)
    assert found, f"no instruction total in {dump}"
    return int(found.group(1)) / INSTRUCTION_REQUESTS


def envoy_instructions() -> dict[str, float]:
    """Instructions per request of one Envoy with each piece of telemetry alone."""
    with tempfile.TemporaryDirectory() as tmp:
        return {
            name: round(_instructions_run(loggers, extra, Path(tmp), str(i)))
            for i, (name, (loggers, extra)) in enumerate(alone_variants().items())
        }


def _callgrind_control(pid: int, command: str) -> None:
    # As the proxy uid: vgdb cannot reach a valgrind of another user without CAP_SYS_PTRACE.
    argv = ["setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups",
            "callgrind_control", f"--{command}", str(pid)]  # fmt: skip
    subprocess.run(argv, check=True, capture_output=True, timeout=120)


def _valgrind_pid(pod: Any) -> int:
    for pid in pod.ns.pids():
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().startswith(("callgrind", "valgrind")):
                return int(pid)
    raise AssertionError("no Envoy under valgrind in the pod")


def lab_instructions() -> dict[str, dict[str, float]]:
    """Instructions per request of the lab's two sidecars (client and web) under callgrind,
    telemetry off and on: the lab's figure that does not move with the machine's load. A load
    thread in the client pod sends keep-alive requests through both; the counters are zeroed
    and dumped while it runs (valgrind answers only a busy process)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        out = work / "out"
        out.mkdir(mode=0o777)
        out.chmod(0o777)
        wrapper = work / "envoy-under-callgrind"
        run = f"valgrind --tool=callgrind --callgrind-out-file={out}/%p.out {envoy_binary()}"
        wrapper.write_text(f'#!/bin/sh\nexec {run} "$@"\n')
        wrapper.chmod(0o755)
        lab = NetnsLab("smtelc")
        try:
            configs = {"off": {"metrics": False, "access_log": "off"}, "on": {}}
            m = start(lab, configs["off"], pod_annotations=False,
                      envoy_binary={"client": str(wrapper), "web": str(wrapper)})  # fmt: skip
            pids = {w: _valgrind_pid(m.pod(w)) for w in ("client", "web")}
            results: dict[str, dict[str, float]] = {}
            for name, telemetry in configs.items():
                if name != "off":
                    m.restart_discovery(telemetry)
                results[name] = _counted(m, pids, out)
            return results
        finally:
            lab.close(raise_errors=False)


def _counted(m: Any, pids: dict[str, int], out: Path) -> dict[str, float]:
    done, stop = [0], threading.Event()

    def load() -> None:
        conn: http.client.HTTPConnection | None = None
        while not stop.is_set():
            try:
                conn = conn or http.client.HTTPConnection(WEB, 80, timeout=60)
                conn.request("GET", "/")
                response = conn.getresponse()
                response.read()
                done[0] += response.status == 200
            except (OSError, http.client.HTTPException):
                conn = None  # the first requests under valgrind may time out: start over
                time.sleep(0.2)

    client = m.pod("client").ns
    thread = threading.Thread(target=lambda: client.in_namespace(load), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 300
        while done[0] < 100:  # valgrind translates the request path on its first runs
            assert time.monotonic() < deadline, "no requests through the sidecars under valgrind"
            time.sleep(0.5)
        time.sleep(5)
        for pid in pids.values():
            _callgrind_control(pid, "zero")
        first, before = done[0], set(out.iterdir())
        time.sleep(4 * SECONDS)
        last = done[0]
        for pid in pids.values():
            _callgrind_control(pid, "dump")
        requests = (last + done[0]) / 2 - first  # the dumps are a moment apart
    finally:
        stop.set()
        thread.join(timeout=120)
    counted: dict[str, float] = {}
    for workload, pid in pids.items():
        (dump,) = [f for f in set(out.iterdir()) - before if f.name.startswith(f"{pid}.out.")]
        found = re.search(r"^(?:summary|totals): (\d+)", dump.read_text(), re.M)
        assert found, f"no instruction total in {dump}"
        counted[workload] = round(int(found.group(1)) / requests)
    counted["requests"] = requests
    return counted


def report(results: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = _report_lab(results) if results["runs"] else {}
    alone = results["envoy_alone"]
    if alone:
        med = {k: statistics.median(r["cpu_us_per_req"] for r in v) for k, v in alone.items()}
        summary["envoy_alone_cpu_us_per_req"] = {k: round(v, 1) for k, v in med.items()}
        print("one Envoy, direct response, wrk -c1: CPU per request (median), added over off")
        for k, v in med.items():
            p50s = [r["p50"] for r in alone[k]]
            print(f"  {k:<20}{v:>7.1f} us {v - med['off']:>+7.1f} us  {p50s}")
    in_lab = results.get("lab_instructions")
    if in_lab:
        summary["lab_instructions_per_req"] = in_lab
        off, on = in_lab["off"], in_lab["on"]
        print("the lab's sidecars under callgrind: instructions per request, off -> on")
        for w in ("client", "web"):
            print(f"  {w:<8}{off[w]:>10,.0f} {on[w]:>10,.0f} {on[w] - off[w]:>+9,.0f}"
                  f" ({100 * (on[w] / off[w] - 1):+.1f} %)")  # fmt: skip
        added = sum(on[w] - off[w] for w in ("client", "web")) / sum(
            off[w] for w in ("client", "web")
        )
        summary["lab_added_user_instructions"] = round(added, 4)
        lab_off = summary.get("off")
        if lab_off:  # user space's share of the proxies' CPU, from the timed lab runs
            user = lab_off["user_us_per_req_client"] + lab_off["user_us_per_req_web"]
            total = lab_off["cpu_us_per_req_client"] + lab_off["cpu_us_per_req_web"]
            summary["lab_user_share"] = round(user / total, 4)
            summary["lab_added_cpu_from_instructions"] = round(added * user / total, 4)
            print(f"  both: {100 * added:+.1f} % of their user-space instructions; user space is "
                  f"{100 * user / total:.0f} % of their CPU when off, so about "
                  f"{100 * added * user / total:+.1f} % proxy CPU per request")  # fmt: skip
    counted = results.get("envoy_instructions")
    if counted:
        summary["envoy_instructions_per_req"] = counted
        print("one Envoy under callgrind: instructions per request, added over off")
        for k, v in counted.items():
            print(f"  {k:<20}{v:>9,.0f} {v - counted['off']:>+9,.0f}")
    results["summary"] = summary
    results["goals"] = GOALS
    return results


def _report_lab(results: dict[str, Any]) -> dict[str, Any]:
    print(f"telemetry on vs off, wrk -c1 keep-alive, {results['seconds_per_run']} s x "
          f"{results['rounds']} rounds per mode (shared 2-core box)")  # fmt: skip
    print(f"{'mode':<12}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'cpu us/req client|web':>24}")
    summary: dict[str, Any] = {}
    for name, runs in results["runs"].items():
        med = {
            k: statistics.median(r[k] for r in runs)
            for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req_client", "cpu_us_per_req_web",
                      "user_us_per_req_client", "user_us_per_req_web")
        }  # fmt: skip
        summary[name] = {k: round(v, 4) for k, v in med.items()}
        cpu = f"{med['cpu_us_per_req_client']:.1f} | {med['cpu_us_per_req_web']:.1f}"
        print(f"{name:<12}{med['rps']:>9.0f}{med['p50_ms']:>9.3f}{med['p99_ms']:>9.3f}{cpu:>24}")
        assert all(r["non_2xx"] == 0 and r["socket_errors"] == 0 for r in runs), runs
    off = summary["off"]
    for name in ("on", "on+tracing"):
        on = summary[name]
        cpu_off = off["cpu_us_per_req_client"] + off["cpu_us_per_req_web"]
        cpu_on = on["cpu_us_per_req_client"] + on["cpu_us_per_req_web"]
        summary[f"{name}_added_p50_ms"] = round(on["p50_ms"] - off["p50_ms"], 4)
        summary[f"{name}_added_cpu_per_request"] = round(cpu_on / cpu_off - 1, 4)
        print(
            f"{name}: added p50 {on['p50_ms'] - off['p50_ms']:+.3f} ms "
            f"(goal <= {GOALS['added_p50_ms']}), proxy CPU per request (both Envoys) "
            f"{100 * (cpu_on / cpu_off - 1):+.1f} % "
            f"(goal <= {100 * GOALS['added_cpu_per_request']:.0f} %)"
        )
    return summary


def main() -> int:
    if os.geteuid() != 0 or shutil.which("wrk") is None:
        print("bench_telemetry: needs root and wrk (apt-get install -y wrk); skipped")
        return 0
    started = time.monotonic()
    # BENCH_PARTS: a comma-separated choice of lab, alone (one Envoy, CPU time), instructions
    # (one Envoy under callgrind; needs valgrind), lab-instructions (the lab's two sidecars
    # under callgrind). Default: all that can run here.
    parts = set(os.environ.get("BENCH_PARTS", "lab,alone,instructions,lab-instructions").split(","))
    measured: dict[str, Any] = run() if "lab" in parts else {"runs": {}}
    measured["envoy_alone"] = envoy_alone() if "alone" in parts else {}
    if "lab-instructions" in parts:
        if shutil.which("callgrind_control") and shutil.which("setpriv"):
            measured["lab_instructions"] = lab_instructions()
        else:
            print("no valgrind/setpriv here: the lab's instructions not counted")
    if "instructions" in parts:
        if shutil.which("callgrind_control"):
            measured["envoy_instructions"] = envoy_instructions()
        else:
            print("no valgrind here (apt-get install -y valgrind): instructions not counted")
    results = report(measured)
    results["wall_seconds"] = round(time.monotonic() - started, 1)
    write_results("telemetry", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
