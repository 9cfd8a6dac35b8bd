"""Benchmark of `sidemesh serve`: POST /mutate against the stack's ceiling, over HTTPS.

For 1 and 2 workers, the same server process answers, in one run:

* ``noop``   — ``POST /noop``: read the body, parse it, answer ``allowed`` (the ceiling of
  FastAPI + uvicorn + TLS on this machine);
* ``mutate`` — ``POST /mutate`` with a realistic ~5 KB pod (``webhook/samples/review.json``):
  the full review, the injection core, metrics and the JSON log line;
* ``mutate, new TLS handshake per request`` — the same with ``Connection: close``.

Besides the server's CPU per request (noise-robust: what a review costs, whatever the
neighbours do), the table shows wrk's own CPU per request: the load generator shares the two
cores, and with a handshake per request its side of the handshake costs more than the server's.

The load generator is wrk (16 keep-alive connections, HTTPS, on the same machine), driven by a
small Lua script. Figures: requests/s, p50, p99, the ratio mutate/noop, the speed-up of 2
workers over 1 and the RSS of each worker after the load. Goals (GOALS below) are checked and
printed; the JSON goes to ``bench-results/webhook.json``.

    .venv/bin/python tests/bench/bench_webhook.py [--seconds 5] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "webhook" / "samples" / "review.json"
#: ``sidemesh serve`` with the ceiling endpoint ``POST /noop`` added (test-only).
NOOP_SERVE = Path(__file__).resolve().parent / "noop_serve.py"
sys.path.insert(0, str(REPO))

from tests.bench.results import write_results  # noqa: E402
from tests.support.ports import free_port  # noqa: E402

CONNECTIONS = 16

GOALS = {
    "ratio": 0.85,  # mutate / noop throughput, keep-alive
    "p99_ms": 5.0,  # mutate p99 at 16 connections
    "scaling": 1.4,  # 2 workers / 1 worker, mutate
    "handshake_rps": 1200,  # mutate with a new TLS handshake per request
    "rss_mb": 80,  # per worker
}

LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
if os.getenv("BENCH_CLOSE") == "1" then wrk.headers["Connection"] = "close" end
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.body = f:read("*a")
f:close()
"""


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wrk(url: str, seconds: float, body: Path, script: Path, *, close: bool) -> dict[str, Any]:
    env = {**os.environ, "BENCH_BODY": str(body), "BENCH_CLOSE": "1" if close else "0"}
    cmd = ["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{seconds:g}s", "--latency", "-s", str(script), url]
    before = _children_cpu()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    client_cpu = _children_cpu() - before  # wrk's own CPU: it shares the 2 cores with the server
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    socket_errors = sum(int(x) for x in errors.groups()) if errors else 0
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return {
        "rps": round(rps, 1),
        "p50_ms": round(p50, 3),
        "p99_ms": round(p99, 3),
        "requests": total,
        "non_2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": socket_errors,
        "client_cpu_seconds": client_cpu,
    }


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmdline:
            kids.append(int(entry.name))
    return kids


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of the server processes (noise-robust: a review's own cost)."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def measure(
    url: str, seconds: float, rounds: int, body: Path, script: Path, pids: list[int]
) -> dict[str, dict[str, Any]]:
    """noop, mutate and mutate-with-handshake, interleaved in ``rounds`` short slices, so that
    a neighbour's burst of load hits all three alike rather than one of them."""
    slices: dict[str, list[dict[str, Any]]] = {"noop": [], "mutate": [], "mutate_handshake": []}
    cpu: dict[str, float] = dict.fromkeys(slices, 0.0)
    each = max(1, round(seconds / rounds))
    for _ in range(rounds):
        for key in slices:
            path = "/noop" if key == "noop" else "/mutate"
            before = _cpu_seconds(pids)
            slices[key].append(wrk(url + path, each, body, script, close=key.endswith("shake")))
            cpu[key] += _cpu_seconds(pids) - before
    out = {}
    for key, runs in slices.items():
        requests = sum(r["requests"] for r in runs)
        out[key] = {
            "rps": round(sum(r["rps"] for r in runs) / len(runs), 1),
            "p50_ms": sorted(r["p50_ms"] for r in runs)[len(runs) // 2],
            "p99_ms": max(r["p99_ms"] for r in runs),
            "requests": requests,
            "non_2xx": sum(r["non_2xx"] for r in runs),
            "socket_errors": sum(r["socket_errors"] for r in runs),
            "server_cpu_us_per_request": round(cpu[key] / max(requests, 1) * 1e6, 1),
            "client_cpu_us_per_request": round(
                sum(r["client_cpu_seconds"] for r in runs) / max(requests, 1) * 1e6, 1
            ),
        }
    return out


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def _wait_ready(url: str, ca: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("sidemesh serve exited during start-up")
        if not ca.exists():  # the development PKI is being created
            time.sleep(0.1)
            continue
        ctx = ssl.create_default_context(cafile=str(ca))
        try:
            with urllib.request.urlopen(f"{url}/readyz", context=ctx, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("sidemesh serve did not become ready")


def _check_answer(url: str, ca: Path, body: bytes) -> None:
    ctx = ssl.create_default_context(cafile=str(ca))
    req = urllib.request.Request(
        f"{url}/mutate", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, context=ctx, timeout=5) as r:
        answer = json.loads(r.read())
    assert answer["response"]["patchType"] == "JSONPatch", "the benchmark must measure injection"


def run(
    workers: int, seconds: float, rounds: int, tmp: Path, body: Path, script: Path
) -> dict[str, Any]:
    port = free_port()
    cert_dir = tmp / "certs"
    url = f"https://127.0.0.1:{port}"
    cmd = [sys.executable, str(NOOP_SERVE), "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--cert-dir", str(cert_dir), "--workers", str(workers)]
    cmd += ["--shutdown-delay", "0"]
    # Logs stay at info, as in production (one JSON line per review), into a file.
    with (tmp / f"serve-{workers}.log").open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log)
    try:
        _wait_ready(url, cert_dir / "ca.crt", proc)
        _check_answer(url, cert_dir / "ca.crt", body.read_bytes())
        pids = _children(proc.pid) if workers > 1 else [proc.pid]
        wrk(f"{url}/mutate", 1, body, script, close=False)  # warm-up
        result: dict[str, Any] = {
            "workers": workers,
            **measure(url, seconds, rounds, body, script, pids),
        }
        result["rss_mb"] = [_rss_mb(pid) for pid in pids]
        result["ratio"] = round(result["mutate"]["rps"] / result["noop"]["rps"], 3)
        return result
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("BENCH_SECONDS", 5)))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved slices per measurement (default 3)"
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:  # skip loudly, so that `make bench` still runs the others
        print("bench_webhook: SKIPPED, needs wrk (apt-get install wrk)", file=sys.stderr)
        write_results("webhook", {"skipped": "wrk not installed"})
        return 0
    runs = []
    with tempfile.TemporaryDirectory(prefix="sidemesh-bench-") as tmp_name:
        tmp = Path(tmp_name)
        body = tmp / "review.json"
        body.write_bytes(json.dumps(json.loads(SAMPLE.read_text()), separators=(",", ":")).encode())
        script = tmp / "post.lua"
        script.write_text(LUA)
        for workers in args.workers:
            runs.append(run(workers, args.seconds, args.rounds, tmp, body, script))
        pod_bytes = body.stat().st_size

    print(
        f"\nsidemesh serve over HTTPS, wrk {CONNECTIONS} connections, {args.seconds:g} s each "
        f"in {args.rounds} interleaved rounds, "
        f"review body {pod_bytes} bytes, {os.cpu_count()} CPUs (load generator on the same box)"
    )
    header = (
        f"{'workers':>7}  {'endpoint':<28} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'CPU us/req':>10} {'wrk us/req':>10} {'errors':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in runs:
        for key, label in (
            ("noop", "noop (ceiling)"),
            ("mutate", "mutate"),
            ("mutate_handshake", "mutate, handshake/request"),
        ):
            m = r[key]
            print(
                f"{r['workers']:>7}  {label:<28} {m['rps']:>9.0f} {m['p50_ms']:>8.2f} "
                f"{m['p99_ms']:>8.2f} {m['server_cpu_us_per_request']:>10.0f} "
                f"{m['client_cpu_us_per_request']:>10.0f} {m['non_2xx'] + m['socket_errors']:>6}"
            )
        print(f"{'':>7}  ratio mutate/noop {r['ratio']:.2f}, RSS per worker {r['rss_mb']} MB")
    print(
        "CPU us/req: the server's user+system CPU per request (all workers); wrk us/req: the load "
        "generator's own,\non the same cores. With a handshake per request wrk's side of the "
        "handshake is the larger one, so\n1e6 / (server CPU us/req) is what one server core "
        "could answer with a client elsewhere."
    )

    summary: dict[str, Any] = {
        "connections": CONNECTIONS,
        "seconds": args.seconds,
        "body_bytes": pod_bytes,
        "cpus": os.cpu_count(),
        "runs": runs,
        "goals": GOALS,
    }
    by_workers = {r["workers"]: r for r in runs}
    checks = []
    if 1 in by_workers:
        one = by_workers[1]
        checks += [
            ("ratio mutate/noop (1 worker)", one["ratio"], ">=", GOALS["ratio"]),
            ("p99 mutate ms (1 worker)", one["mutate"]["p99_ms"], "<=", GOALS["p99_ms"]),
            (
                "handshake req/s (1 worker)",
                one["mutate_handshake"]["rps"],
                ">=",
                GOALS["handshake_rps"],
            ),
        ]
        shake = one["mutate_handshake"]
        summary["handshake_server_capacity_rps"] = round(
            1e6 / max(shake["server_cpu_us_per_request"], 1)
        )
    if 1 in by_workers and 2 in by_workers:
        scaling = round(by_workers[2]["mutate"]["rps"] / by_workers[1]["mutate"]["rps"], 2)
        summary["scaling_2_over_1"] = scaling
        checks += [
            ("ratio mutate/noop (2 workers)", by_workers[2]["ratio"], ">=", GOALS["ratio"]),
            ("2 workers / 1 worker", scaling, ">=", GOALS["scaling"]),
        ]
    rss = max(mb for r in runs for mb in r["rss_mb"])
    checks.append(("max RSS per worker MB", rss, "<=", GOALS["rss_mb"]))
    print("\ngoals:")
    summary["checks"] = []
    for name, value, op, goal in checks:
        ok = value >= goal if op == ">=" else value <= goal
        summary["checks"].append({"name": name, "value": value, "goal": f"{op} {goal}", "ok": ok})
        print(f"  {'ok  ' if ok else 'MISS'} {name}: {value} (goal {op} {goal})")
    if "handshake_server_capacity_rps" in summary:
        print(
            "  (handshake per request, 1 worker: one server core could answer "
            f"{summary['handshake_server_capacity_rps']}/s at the server CPU measured; wrk "
            f"spent {by_workers[1]['mutate_handshake']['client_cpu_us_per_request']:.0f} us "
            "per request of the same 2 cores)"
        )
    errors = sum(
        r[k]["non_2xx"] + r[k]["socket_errors"]
        for r in runs
        for k in ("noop", "mutate", "mutate_handshake")
    )
    summary["errors"] = errors
    write_results("webhook", summary)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
