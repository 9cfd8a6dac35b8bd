"""Soak of `sidemesh serve` under hostile clients, over HTTPS on 127.0.0.1.

Four phases against real `sidemesh serve` processes (default limits unless said):

* ``fuzz``   — ``--reviews`` (default 100,000) randomly mutated AdmissionReviews from 2
  client processes on keep-alive connections: counts by answer, server RSS before/after,
  ``sidemesh_unexpected_errors_total``. Goals: 0 5xx, 0 generic answers, RSS growth < 10 MB.
* ``slow``   — 500 connections sending one header line every 2 s: seconds from each one's
  first byte to the server closing it. Goal: all closed within the header timeout (+1 s).
* ``headers``— 8 connections each sending 4 MiB of one never-finished header (32 MiB in all).
  Goal: RSS growth < 20 MB.
* ``flood``  — a server with ``--max-connections 64`` held by 192 unfinished requests; then a
  normal client's review on a new connection. Goal: answered within 1 s.

Figures are printed and written to ``bench-results/hostile.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import http.client
import json
import os
import random
import re
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "webhook" / "samples" / "review.json"
sys.path.insert(0, str(REPO))

from tests.bench.results import write_results  # noqa: E402
from tests.support.ports import free_port  # noqa: E402

HEAD = b"POST /mutate HTTP/1.1\r\nHost: sidemesh\r\nContent-Type: application/json\r\n"
GENERIC = {"unprocessable", "internal", "invalid", "internal-error"}
KEYS = ["apiVersion", "kind", "request", "uid", "operation", "object", "namespace", "metadata",
        "spec", "containers", "initContainers", "volumes", "annotations", "labels", "ports",
        "readinessProbe", "httpGet", "securityContext", "sidemesh.io/inject",
        "sidemesh.io/status", "traffic.sidemesh.io/exclude-inbound-ports"]  # fmt: skip


# --- a server --------------------------------------------------------------------------------


class Server:
    def __init__(self, tmp: Path, *args: str) -> None:
        self.port = free_port()
        self.cert_dir = tmp / f"certs-{self.port}"
        cmd = [sys.executable, "-m", "webhook", "serve", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--cert-dir", str(self.cert_dir)]
        cmd += ["--shutdown-delay", "0", "--log-level", "warning", *args]
        self.log = (tmp / f"serve-{self.port}.log").open("wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit("sidemesh serve exited during start-up")
            with contextlib.suppress(OSError, ssl.SSLError, FileNotFoundError):
                if self.get("/readyz")[0] == 200:
                    return
            time.sleep(0.2)
        raise SystemExit("sidemesh serve did not become ready")

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert_dir / "ca.crt"))

    def get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context())
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def tls_socket(self) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        return self.context().wrap_socket(raw, server_hostname="127.0.0.1")

    def rss_mb(self) -> float:
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        kib = int(re.search(r"VmRSS:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
        return round(kib / 1024, 1)

    def metric(self, name: str, **labels: str) -> float:
        total = 0.0
        for line in self.get("/metrics")[1].decode().splitlines():
            if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# --- fuzz ------------------------------------------------------------------------------------


def _value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.randint(-(2**63), 2**63)
    if kind == 3:
        return rng.uniform(-1e9, 1e9)
    if kind == 4:
        return "".join(rng.choice("ab/-.:=\n\x00é") for _ in range(rng.randrange(12)))
    if kind == 5:
        return rng.choice(["CREATE", "Pod", "", "true", "80", "sidemesh-proxy", "v1"])
    if kind in (6, 7):
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(KEYS): _value(rng, depth + 1) for _ in range(rng.randrange(4))}


def _random_path(doc: Any, rng: random.Random) -> tuple[Any, ...]:
    """A random walk from the root (a full enumeration of the sample costs milliseconds)."""
    path: tuple[Any, ...] = ()
    node = doc
    # Into request.object most of the time: the envelope's own checks are quickly exhausted.
    while isinstance(node, dict | list) and node and (len(path) < 2 or rng.random() < 0.85):
        if len(path) < 2 and rng.random() < 0.05:
            break
        if isinstance(node, dict):
            key = rng.choice(list(node))
            if not path and "request" in node and rng.random() < 0.9:
                key = "request"
            elif path == ("request",) and "object" in node and rng.random() < 0.9:
                key = "object"
        else:
            key = rng.randrange(len(node))
        path, node = (*path, key), node[key]
    return path


def _mutate(doc: Any, rng: random.Random) -> Any:
    for _ in range(rng.randint(1, 4)):
        path = _random_path(doc, rng)
        if not path:
            continue
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        action = rng.randrange(4)
        if action == 0:
            del parent[path[-1]]
        elif action == 1:
            parent[path[-1]] = _value(rng)
        elif action == 2:
            parent[path[-1]] = rng.choice([None, [], {}, "", 0, True, "CREATE", "Pod"])
        elif isinstance(parent[path[-1]], dict):
            parent[path[-1]][rng.choice(KEYS)] = _value(rng)
        elif isinstance(parent[path[-1]], list):
            parent[path[-1]].append(_value(rng))
    return doc


def _label(status: int, body: bytes) -> str:
    try:
        answer = json.loads(body)
    except ValueError:
        return f"{status} not-json"
    if status != 200:
        return f"{status} {answer.get('error')}"
    response = answer.get("response", {})
    if response.get("allowed"):
        return "200 allowed+patch" if "patch" in response else "200 allowed"
    return f"200 denied code {response.get('status', {}).get('code')}"


def fuzz_client(port: int, ca: str, count: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    seeds = [json.loads(SAMPLE.read_text())]
    pod = seeds[0]["request"]["object"]
    seeds.append({**copy.deepcopy(seeds[0]), "apiVersion": "admission.k8s.io/v1beta1"})
    seeds.append({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                  "request": {"uid": "u", "operation": "CREATE", "namespace": "demo",
                              "kind": {"group": "", "version": "v1", "kind": "Pod"},
                              "object": copy.deepcopy(pod)}})  # fmt: skip
    seeds = [orjson.dumps(doc) for doc in seeds]
    ctx = ssl.create_default_context(cafile=ca)
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    counts: Counter[str] = Counter()
    headers = {"Content-Type": "application/json"}
    for i in range(count):
        if i % 50 == 0:
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(300)))
        else:
            doc = orjson.loads(rng.choice(seeds))  # a fresh copy, quickly
            body = json.dumps(_mutate(doc, rng)).encode()
        try:
            conn.request("POST", "/mutate", body=body, headers=headers)
            r = conn.getresponse()
            counts[_label(r.status, r.read())] += 1
        except (OSError, http.client.HTTPException):
            counts["connection error"] += 1
            conn.close()
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    conn.close()
    return dict(counts)


def phase_fuzz(tmp: Path, reviews: int) -> dict[str, Any]:
    srv = Server(tmp)
    try:
        fuzz_client(srv.port, str(srv.cert_dir / "ca.crt"), 500, 1)  # warm-up
        before = srv.rss_mb()
        started = time.monotonic()
        with ProcessPoolExecutor(2) as pool:
            parts = list(
                pool.map(
                    fuzz_client,
                    [srv.port] * 2,
                    [str(srv.cert_dir / "ca.crt")] * 2,
                    [reviews // 2, reviews - reviews // 2],
                    [11, 12],
                )
            )
        seconds = time.monotonic() - started
        counts: Counter[str] = Counter()
        for part in parts:
            counts.update(part)
        return {
            "reviews": sum(counts.values()),
            "seconds": round(seconds, 1),
            "by_answer": dict(counts.most_common()),
            "rss_before_mb": before,
            "rss_after_mb": srv.rss_mb(),
            "five_xx": sum(n for k, n in counts.items() if k.startswith("5")),
            "generic": sum(n for k, n in counts.items() if k.split(" ", 1)[1] in GENERIC),
            "unexpected_errors": srv.metric("sidemesh_unexpected_errors_total"),
        }
    finally:
        srv.stop()


# --- slow connections, endless headers, flood --------------------------------------------------


def phase_slow(tmp: Path, connections: int) -> dict[str, Any]:
    srv = Server(tmp)
    try:
        before = srv.rss_mb()
        sel = selectors.DefaultSelector()
        first_byte: dict[ssl.SSLSocket, float] = {}
        opening = time.monotonic()
        for _ in range(connections):
            sock = srv.tls_socket()
            sock.sendall(HEAD)
            first_byte[sock] = time.monotonic()
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ)
        opened_in = time.monotonic() - opening
        peak = srv.rss_mb()
        closed_after: list[float] = []
        next_line = time.monotonic() + 2
        deadline = time.monotonic() + 60
        while first_byte and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.2):
                sock = key.fileobj  # type: ignore[assignment]
                try:
                    data = sock.recv(65536)
                except ssl.SSLWantReadError:
                    continue
                except OSError:
                    data = b""
                if data and not data.startswith(b"HTTP/1.1 408"):
                    continue
                closed_after.append(time.monotonic() - first_byte.pop(sock))
                sel.unregister(sock)
                sock.close()
            if time.monotonic() >= next_line:  # one more header line on every open connection
                next_line += 2
                for sock in list(first_byte):
                    with contextlib.suppress(OSError):
                        sock.send(b"X-Slow: yes\r\n")
        closed_after.sort()
        return {
            "connections": connections,
            "closed": len(closed_after),
            "still_open_after_60s": len(first_byte),
            "opened_all_in_s": round(opened_in, 2),
            "closed_after_s_p50": round(closed_after[len(closed_after) // 2], 2),
            "closed_after_s_p99": round(closed_after[len(closed_after) * 99 // 100], 2),
            "closed_after_s_max": round(closed_after[-1], 2),
            "header_timeout_s": 10.0,
            "rss_before_mb": before,
            "rss_with_all_open_mb": peak,
            "refusals": srv.metric("sidemesh_http_refusals_total", reason="header-timeout"),
        }
    finally:
        srv.stop()


def phase_headers(tmp: Path) -> dict[str, Any]:
    srv = Server(tmp)
    try:
        before = srv.rss_mb()
        socks = [srv.tls_socket() for _ in range(8)]
        for sock in socks:
            sock.sendall(HEAD + b"X-Fill: ")
        piece, sent, live = b"a" * 65536, [0] * 8, set(range(8))
        while live:
            for i in sorted(live):
                try:
                    socks[i].sendall(piece)
                    sent[i] += len(piece)
                except OSError:
                    live.discard(i)
                    continue
                if sent[i] >= 4 << 20:
                    live.discard(i)
        during = srv.rss_mb()
        for sock in socks:
            sock.close()
        time.sleep(1)
        return {
            "connections": 8,
            "bytes_offered_mb": 32,
            "bytes_taken_kb": round(sum(sent) / 1024),
            "rss_before_mb": before,
            "rss_during_mb": during,
            "rss_after_mb": srv.rss_mb(),
            "refusals": srv.metric("sidemesh_http_refusals_total", reason="header-too-large"),
        }
    finally:
        srv.stop()


def phase_flood(tmp: Path, cap: int) -> dict[str, Any]:
    srv = Server(tmp, "--max-connections", str(cap))
    try:
        held = []
        for _ in range(3 * cap):
            sock = srv.tls_socket()
            sock.sendall(HEAD)
            held.append(sock)
        body = SAMPLE.read_bytes()
        started = time.monotonic()
        conn = http.client.HTTPSConnection("127.0.0.1", srv.port, context=srv.context())
        conn.request("POST", "/mutate", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        status = r.status
        r.read()
        seconds = time.monotonic() - started
        conn.close()
        for sock in held:
            with contextlib.suppress(OSError):
                sock.close()
        return {
            "cap": cap,
            "flood_connections": 3 * cap,
            "normal_client_status": status,
            "normal_client_seconds": round(seconds, 3),
            "evicted": srv.metric("sidemesh_http_refusals_total", reason="connection-limit"),
        }
    finally:
        srv.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--reviews", type=int, default=int(os.environ.get("BENCH_REVIEWS", 100_000))
    )
    parser.add_argument("--slow", type=int, default=500)
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sidemesh-hostile-") as tmp_name:
        tmp = Path(tmp_name)
        phases: tuple[tuple[str, Callable[[], dict[str, Any]]], ...] = (
            ("headers", lambda: phase_headers(tmp)),
            ("flood", lambda: phase_flood(tmp, 64)),
            ("slow", lambda: phase_slow(tmp, args.slow)),
            ("fuzz", lambda: phase_fuzz(tmp, args.reviews)),
        )
        for name, run in phases:
            results[name] = run()
            print(f"== {name}\n{json.dumps(results[name], indent=2)}", flush=True)
    fuzz, slow, heads, flood = (results[k] for k in ("fuzz", "slow", "headers", "flood"))
    checks = [
        ("fuzz: 5xx answers", fuzz["five_xx"], "==", 0),
        ("fuzz: generic answers", fuzz["generic"], "==", 0),
        ("fuzz: unexpected errors", fuzz["unexpected_errors"], "==", 0),
        ("fuzz: RSS growth MB", round(fuzz["rss_after_mb"] - fuzz["rss_before_mb"], 1), "<", 10),
        ("slow: still open after 60 s", slow["still_open_after_60s"], "==", 0),
        ("slow: max seconds to close", slow["closed_after_s_max"], "<", 11),
        ("headers: RSS growth MB", round(heads["rss_during_mb"] - heads["rss_before_mb"], 1),
         "<", 20),
        ("flood: normal client seconds", flood["normal_client_seconds"], "<", 1),
        ("flood: normal client status", flood["normal_client_status"], "==", 200),
    ]  # fmt: skip
    print("\ngoals:")
    results["checks"] = []
    for name, value, op, goal in checks:
        ok = value == goal if op == "==" else value < goal
        results["checks"].append({"name": name, "value": value, "goal": f"{op} {goal}", "ok": ok})
        print(f"  {'ok  ' if ok else 'MISS'} {name}: {value} (goal {op} {goal})")
    write_results("hostile", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
