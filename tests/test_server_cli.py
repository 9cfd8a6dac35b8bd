"""`sidemesh serve` as a user runs it: a real process, real HTTPS, real signals."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import REPO, require_tools
from tests.support.jwks_issuer import DEFAULT_ISSUER, Issuer
from tests.support.ports import free_port
from tests.support.serve_process import SIDEMESH, Serve
from tests.support.webhook_https import SAMPLE_REVIEW, admission_review, client_ssl, simple_pod


@pytest.fixture()
def serve(tmp_path: Path) -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def test_a_fresh_checkout_gets_a_pki_and_the_printed_curl_works(
    tmp_path: Path, serve: list[Serve]
) -> None:
    require_tools("curl")
    s = Serve(tmp_path)
    serve.append(s)
    s.wait_ready()
    assert {p.name for p in s.cert_dir.iterdir()} >= {"ca.crt", "ca.key", "tls.crt", "tls.key"}
    match = re.search(r"^\s+(curl --cacert .*/mutate)$", s.log.read_text(), re.MULTILINE)
    assert match, s.log.read_text()
    out = subprocess.run(
        [*shlex.split(match.group(1)), "-sS"], cwd=REPO, capture_output=True, check=True
    )
    answer = json.loads(out.stdout)
    sample = json.loads(SAMPLE_REVIEW.read_text())
    assert answer["response"]["uid"] == sample["request"]["uid"]
    assert answer["response"]["allowed"] is True and answer["response"]["patchType"] == "JSONPatch"
    assert s.stop() == 0
    reviews = [line for line in s.lines() if line.get("event") == "review"]
    assert reviews and reviews[-1]["decision"] == "injected"
    assert reviews[-1]["pod"] == "checkout-7d9f8b6c5d-" and reviews[-1]["namespace"] == "shop"
    assert "object" not in reviews[-1] and "BEGIN" not in s.log.read_text()


def _csr() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cart")]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_the_ca_endpoint_is_served_next_to_the_webhook(tmp_path: Path, serve: list[Serve]) -> None:
    issuer = Issuer.create(DEFAULT_ISSUER)
    jwks = issuer.write_jwks(tmp_path / "jwks.json")
    s = Serve(tmp_path, "--jwks-file", str(jwks), "--jwks-issuer", DEFAULT_ISSUER)
    serve.append(s)
    s.wait_ready()
    with s.client() as c:
        token = issuer.token("shop", "cart", "cart-7d9f-abcde")
        r = c.post(
            "/v1/certificates",
            json={"csr": _csr()},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 200, r.text
        assert r.json()["spiffeId"] == "spiffe://cluster.local/ns/shop/sa/cart"
        assert c.post("/mutate", json=admission_review(simple_pod())).status_code == 200
    assert s.stop() == 0


def test_sigterm_finishes_the_request_in_flight_then_exits_0(
    tmp_path: Path, serve: list[Serve]
) -> None:
    s = Serve(tmp_path)
    serve.append(s)
    s.wait_ready()
    body = json.dumps(admission_review(simple_pod())).encode()
    head = (
        f"POST /mutate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    ctx = client_ssl(s.cert_dir / "ca.crt")
    with (
        socket.create_connection(("127.0.0.1", s.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
    ):
        conn.sendall(head + body[:100])  # the request is in flight ...
        time.sleep(0.3)
        s.proc.send_signal(signal.SIGTERM)  # ... when the pod is told to stop
        time.sleep(0.5)
        assert s.proc.poll() is None, "must wait for the request in flight"
        conn.sendall(body[100:])
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    assert b'"patchType":"JSONPatch"' in reply
    assert s.proc.wait(timeout=30) == 0
    with pytest.raises(OSError):  # and nothing listens any more
        socket.create_connection(("127.0.0.1", s.port), timeout=2).close()


def test_sigterm_drains_first_serving_new_connections_while_not_ready(
    tmp_path: Path, serve: list[Serve]
) -> None:
    s = Serve(tmp_path, shutdown_delay=2)
    serve.append(s)
    s.wait_ready()
    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with s.client() as c:  # a new connection, after SIGTERM
        assert c.get("/readyz").status_code == 503
        assert "shutting down" in c.get("/readyz").json()["problems"]
        r = c.post("/mutate", json=admission_review(simple_pod()))
        assert r.status_code == 200 and r.json()["response"]["patchType"] == "JSONPatch"
    started = time.monotonic()
    assert s.proc.wait(timeout=30) == 0
    assert time.monotonic() - started < 10


def _children(pid: int) -> set[int]:
    """The worker processes of a supervisor (not multiprocessing's resource tracker)."""
    kids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z" and b"spawn_main" in cmdline:
                kids.add(int(entry.name))
    return kids


def _gone(pids: set[int], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{pid}").exists() for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_two_workers_share_the_port_and_stop_together(tmp_path: Path, serve: list[Serve]) -> None:
    metrics_port = free_port()
    s = Serve(tmp_path, "--workers", "2", "--metrics-port", str(metrics_port))
    serve.append(s)
    s.wait_ready()
    s.wait_listening(2)
    workers = _children(s.proc.pid)
    assert len(workers) == 2
    sent = 60
    for i in range(sent):  # a new connection (and handshake) each time
        with s.client() as c:
            r = c.post("/mutate", json=admission_review(simple_pod(), uid=f"w-{i}"))
            assert r.json()["response"]["uid"] == f"w-{i}"
    pids = {line["pid"] for line in s.lines() if line.get("event") == "review"}
    assert len(pids) == 2, "SO_REUSEPORT should have spread 60 connections over both workers"
    scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    total = sum(
        float(line.split()[-1])
        for line in scraped.splitlines()
        if line.startswith("sidemesh_admission_requests_total{")
    )
    assert total == sent  # the sum over both workers
    assert s.stop() == 0
    assert _gone(workers)


def test_a_worker_that_dies_is_replaced(tmp_path: Path, serve: list[Serve]) -> None:
    s = Serve(tmp_path, "--workers", "2")
    serve.append(s)
    s.wait_ready()
    s.wait_listening(2)
    first = _children(s.proc.pid)
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        now = _children(s.proc.pid)
        if victim not in now and len(now) >= 2:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the dead worker was not replaced")
    s.wait_ready()
    s.wait_listening(2)
    assert s.stop() == 0


def test_a_bad_config_fails_at_start_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "mesh.yaml"
    bad.write_text("proxy:\n  cpu_request: lots\n")
    out = subprocess.run(
        [
            *SIDEMESH,
            "serve",
            "--port",
            str(free_port()),
            "--config",
            str(bad),
            "--cert-dir",
            str(tmp_path / "certs"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "proxy.cpu_request" in out.stderr and "lots" in out.stderr


def test_a_port_in_use_fails_at_start(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        out = subprocess.run(
            [
                *SIDEMESH,
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--cert-dir",
                str(tmp_path / "certs"),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 1 and f"127.0.0.1:{port}" in out.stderr


def test_a_second_server_on_the_same_port_refuses_to_start(
    tmp_path: Path, serve: list[Serve]
) -> None:
    first = Serve(tmp_path)
    serve.append(first)
    first.wait_ready()
    out = subprocess.run(
        [
            *SIDEMESH,
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(first.port),
            "--cert-dir",
            str(first.cert_dir),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "another process is listening" in out.stderr
    assert first.stop() == 0


def test_workers_do_not_outlive_a_killed_supervisor(tmp_path: Path, serve: list[Serve]) -> None:
    s = Serve(tmp_path, "--workers", "2")
    serve.append(s)
    s.wait_ready()
    s.wait_listening(2)
    workers = _children(s.proc.pid)
    assert len(workers) == 2
    s.proc.kill()
    s.proc.wait()
    assert _gone(workers), "workers kept serving after their supervisor was killed"
