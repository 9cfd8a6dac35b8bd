"""Workload certificates signed per second: in-process, and through the HTTPS API.

In-process (one thread, one core): CSR parse + signature check + key check + sign + PEM, the
exact ``CertificateAuthority.sign_workload`` path; and the JWKS token check alone.

Through the API: ``POST /v1/certificates`` with a JWKS-signed token, over HTTPS with keep-alive
(a few persistent connections from an asyncio client in this process), against

* ``router``: the CA router alone in a FastAPI app under uvicorn (uvloop, httptools), one
  process — the cost of the endpoint itself;
* ``sidemesh serve``: the real server (one worker), configured by environment variables.

No key is generated on the request path: every CSR is made before the clock starts. The
machine is shared (2 cores, other jobs): compare figures within one run.

    .venv/bin/python tests/bench/bench_ca.py [--seconds 3] [--connections 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from tests.bench.results import write_results  # noqa: E402
from tests.support.jwks_issuer import Issuer  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from webhook.ca.authority import CertificateAuthority  # noqa: E402
from webhook.ca.serving import ensure_dev_pki  # noqa: E402
from webhook.ca.tokens import JWKSVerifier  # noqa: E402

SPIFFE = "spiffe://cluster.local/ns/bench/sa/load"
CONFIG_YAML = "ca:\n  rate_per_identity_per_minute: 100000000\n"


def make_csrs(n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        key = ec.generate_private_key(ec.SECP256R1())
        csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
        out.append(csr.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return out


def bench_in_process(seconds: float, csrs: list[bytes]) -> dict[str, float]:
    ca = CertificateAuthority.create(now=datetime.now(UTC))
    now, ttl = datetime.now(UTC), timedelta(hours=24)
    for csr in csrs[:50]:  # warm-up
        ca.sign_workload(csr, SPIFFE, now=now, ttl=ttl)
    rounds = []
    for _ in range(3):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            for csr in csrs:
                ca.sign_workload(csr, SPIFFE, now=now, ttl=ttl)
            count += len(csrs)
        rounds.append(count / (time.perf_counter() - start))
    best = max(rounds)
    return {
        "per_second": best,
        "microseconds": 1e6 / best,
        "median_per_second": statistics.median(rounds),
    }


def bench_token(seconds: float, issuer: Issuer) -> dict[str, float]:
    verifier = JWKSVerifier(issuer.issuer_url, jwks=issuer.jwks())
    token = issuer.token("bench", "load", ttl=3600)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(200):
            verifier._verify_uncached(token)  # the signature check, not the cache
        count += 200
    rate = count / (time.perf_counter() - start)
    return {"per_second": rate, "microseconds": 1e6 / rate}


# --- the HTTPS API ------------------------------------------------------------------------------


def serve_router(cert_dir: str, port: int) -> None:
    """Child process: the CA router alone in a FastAPI app (``--serve-router``)."""
    import uvicorn
    import yaml
    from fastapi import FastAPI

    from webhook.ca.api import router_from_config
    from webhook.config import load_config

    config = load_config(yaml.safe_load(CONFIG_YAML))
    router = router_from_config(config, Path(cert_dir))
    assert router is not None, "no verifier: set SIDEMESH_JWKS_FILE and SIDEMESH_JWKS_ISSUER"
    app = FastAPI()
    app.include_router(router)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        ssl_certfile=f"{cert_dir}/tls.crt",
        ssl_keyfile=f"{cert_dir}/tls.key",
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


async def _client(
    port: int,
    ctx: ssl.SSLContext,
    requests: list[bytes],
    until: float,
    counts: list[int],
    errors: list[str],
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        i = 0
        while time.perf_counter() < until:
            writer.write(requests[i % len(requests)])
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = await reader.readexactly(length)
            if status != 200:
                errors.append(f"{status} {body[:200]!r}")
                return
            counts[0] += 1
    finally:
        writer.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), to express throughput per core."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_api(
    port: int,
    ca_file: Path,
    token: str,
    csrs: list[bytes],
    seconds: float,
    connections: int,
    server_pid: int,
) -> dict[str, float]:
    requests = []
    for csr in csrs:  # a different CSR each time, as real renewals are
        body = json.dumps({"csr": csr.decode()}).encode()
        requests.append(
            b"POST /v1/certificates HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n"
            + f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
    ctx = ssl.create_default_context(cafile=str(ca_file))

    async def run(duration: float) -> tuple[int, list[str]]:
        counts, errors = [0], list[str]()
        until = time.perf_counter() + duration
        await asyncio.gather(
            *(_client(port, ctx, requests, until, counts, errors) for _ in range(connections))
        )
        return counts[0], errors

    asyncio.run(run(0.5))  # warm-up: connections, caches
    cpu0, start = cpu_seconds(server_pid), time.perf_counter()
    count, errors = asyncio.run(run(seconds))
    elapsed, cpu = time.perf_counter() - start, cpu_seconds(server_pid) - cpu0
    if errors:
        raise RuntimeError(f"API errors: {errors[:3]}")
    return {
        "per_second": count / elapsed,
        "requests": count,
        "server_cpu_microseconds": 1e6 * cpu / count,
        # What one fully used server core would sustain: the machine is shared with the client
        # (and other jobs), so wall-clock throughput understates the server.
        "per_server_core_second": count / cpu if cpu > 0 else 0.0,
    }


def start_server(
    kind: str, cert_dir: Path, port: int, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    if kind == "router":
        cmd = [sys.executable, __file__, "--serve-router", str(cert_dir), str(port)]
    else:
        config = cert_dir.parent / "config.yaml"
        config.write_text(CONFIG_YAML)
        cmd = [
            sys.executable, "-m", "webhook", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--cert-dir", str(cert_dir), "--config", str(config), "--log-level", "warning",
        ]  # fmt: skip
    return subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--serve-router", nargs=2, metavar=("DIR", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_router:
        serve_router(args.serve_router[0], int(args.serve_router[1]))
        return 0

    csrs = make_csrs(100)
    issuer = Issuer.create()
    results: dict[str, Any] = {
        "machine": f"{os.cpu_count()} cores, shared with other jobs",
        "in_process_sign": bench_in_process(args.seconds, csrs),
        "in_process_token_rs256": bench_token(args.seconds / 3, issuer),
        "api": {},
    }
    with tempfile.TemporaryDirectory(prefix="sidemesh-bench-ca-") as tmp:
        cert_dir = Path(tmp) / "certs"
        ensure_dev_pki(cert_dir, now=datetime.now(UTC))
        jwks = issuer.write_jwks(Path(tmp) / "jwks.json")
        env = dict(os.environ, SIDEMESH_JWKS_FILE=str(jwks), SIDEMESH_JWKS_ISSUER=issuer.issuer_url)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        token = issuer.token("bench", "load", ttl=3600)
        for kind in ("router", "sidemesh serve"):
            port = free_port()
            proc = start_server(kind, cert_dir, port, env)
            try:
                wait_ready(port, proc)
                results["api"][kind] = bench_api(
                    port,
                    cert_dir / "ca.crt",
                    token,
                    csrs,
                    args.seconds,
                    args.connections,
                    proc.pid,
                )
            except RuntimeError as exc:
                results["api"][kind] = {"error": str(exc)}
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    sign = results["in_process_sign"]
    print(f"{'what':44} {'per second':>10} {'µs each':>8}")
    print(f"{'in-process: CSR → signed PEM (1 thread)':44} {sign['per_second']:10,.0f} "
          f"{sign['microseconds']:8.0f}")  # fmt: skip
    tok = results["in_process_token_rs256"]
    print(f"{'in-process: JWKS token check (RS256)':44} {tok['per_second']:10,.0f} "
          f"{tok['microseconds']:8.0f}")  # fmt: skip
    for kind, res in results["api"].items():
        label = f"HTTPS API x{args.connections} keep-alive: {kind}"
        if "error" in res:
            print(f"{label:44} {'failed':>10}  {res['error']}")
            continue
        res["ratio_to_in_process"] = res["per_second"] / sign["per_second"]
        res["per_core_ratio_to_in_process"] = res["per_server_core_second"] / sign["per_second"]
        print(f"{label:44} {res['per_second']:10,.0f} {1e6 / res['per_second']:8.0f}"
              f"  ({res['ratio_to_in_process']:.2f}x in-process)")  # fmt: skip
        print(f"{'  per server core (server CPU per request)':44} "
              f"{res['per_server_core_second']:10,.0f} {res['server_cpu_microseconds']:8.0f}"
              f"  ({res['per_core_ratio_to_in_process']:.2f}x in-process)")  # fmt: skip
    print("goals: >= 3,000/s in-process on one core; API >= 0.5x of that. Shared machine.")
    write_results("ca", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
