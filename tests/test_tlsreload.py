"""Serving-certificate rotation under load: zero failed requests, then the new cert is served.

The cert dir is laid out the way the kubelet mounts a Secret (``tls.crt -> ..data/tls.crt``,
``..data -> ..<timestamp>``) and rotated the way the kubelet does it: a new timestamped
directory, then an atomic rename of the ``..data`` symlink.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.support.wait import wait_for
from tests.support.webhook_https import (
    Running,
    admission_review,
    client_ssl,
    https_webhook,
    simple_pod,
)
from webhook.ca.authority import CA_CERT, TLS_CERT, TLS_KEY, CertificateAuthority
from webhook.ca.serving import write_serving_pair
from webhook.files import write_atomic


def new_pair(ca_dir: Path) -> tuple[str, str]:
    return CertificateAuthority.load(ca_dir).issue_serving(now=datetime.now(UTC))


def der(pem: str | bytes) -> bytes:
    data = pem.encode() if isinstance(pem, str) else pem
    cert = x509.load_pem_x509_certificate(data)
    return cert.public_bytes(serialization.Encoding.DER)


class SecretVolume:
    """A directory that looks and changes like a mounted Kubernetes Secret."""

    def __init__(self, root: Path, ca_dir: Path) -> None:
        self.root = root
        self.ca_dir = ca_dir
        root.mkdir()
        self.generation = 0
        self.swap(*new_pair(ca_dir))
        for name in (CA_CERT, TLS_CERT, TLS_KEY):
            (root / name).symlink_to(f"..data/{name}")

    def swap(self, cert_pem: str, key_pem: str) -> None:
        self.generation += 1
        stamp = self.root / f"..2026_11_25_{self.generation:04d}"
        stamp.mkdir()
        shutil.copy(self.ca_dir / CA_CERT, stamp / CA_CERT)
        (stamp / TLS_CERT).write_text(cert_pem)
        (stamp / TLS_KEY).write_text(key_pem)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(stamp.name)
        old = os.readlink(self.root / "..data") if (self.root / "..data").is_symlink() else None
        os.replace(tmp, self.root / "..data")
        if old:
            shutil.rmtree(self.root / old)


def served_cert(running: Running) -> bytes:
    ctx = client_ssl(running.cert_dir / CA_CERT)
    with (
        socket.create_connection(("127.0.0.1", running.port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        peer = tls.getpeercert(binary_form=True)
    assert peer is not None
    return peer


class Load:
    """Client threads posting reviews until stopped: half open a new TLS connection per
    request (every request is a handshake), half reuse one keep-alive connection."""

    def __init__(self, running: Running, threads: int = 4) -> None:
        self.running = running
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._loop, args=(i % 2 == 0,), daemon=True)
            for i in range(threads)
        ]

    def _loop(self, fresh_connections: bool) -> None:
        body = admission_review(simple_pod())
        client = self.running.client()
        try:
            while not self._stop.is_set():
                if fresh_connections:
                    client.close()
                    client = self.running.client()
                try:
                    r = client.post("/mutate", json=body)
                    good = r.status_code == 200 and "patch" in r.json()["response"]
                    outcome = "" if good else f"HTTP {r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as exc:
                    outcome = f"{type(exc).__name__}: {exc}"
                with self._lock:
                    if outcome:
                        self.failures.append(outcome)
                    else:
                        self.ok += 1
        finally:
            client.close()

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)


@pytest.fixture()
def ca_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ca"
    d.mkdir()
    CertificateAuthority.create(now=datetime.now(UTC)).save(d)
    return d


@pytest.fixture()
def secret(tmp_path: Path, ca_dir: Path) -> SecretVolume:
    return SecretVolume(tmp_path / "mounted", ca_dir)


@pytest.fixture()
def running(secret: SecretVolume) -> Iterator[Running]:
    with https_webhook(secret.root) as r:
        yield r


def test_rotating_a_mounted_secret_fails_no_request(running: Running, secret: SecretVolume) -> None:
    old = served_cert(running)
    cert_pem, key_pem = new_pair(secret.ca_dir)
    with Load(running) as load:
        wait_for(lambda: load.ok >= 20)
        secret.swap(cert_pem, key_pem)
        wait_for(lambda: served_cert(running) == der(cert_pem))
        done = load.ok
        wait_for(lambda: load.ok >= done + 20)  # and keeps serving on the new one
    assert load.failures == []
    assert old != der(cert_pem) and served_cert(running) == der(cert_pem)
    assert running.tls.reloads == 1
    with running.client() as client:
        text = client.get("/metrics").text
    assert 'sidemesh_serving_cert_reloads_total{result="success"} 1.0' in text
    expiry = x509.load_pem_x509_certificate(cert_pem.encode()).not_valid_after_utc.timestamp()
    # Compared as numbers: the exposition format drops trailing zeros ("1.80363094e+09").
    gauge = "sidemesh_serving_cert_expiry_timestamp_seconds "
    assert [
        float(line.removeprefix(gauge)) for line in text.splitlines() if line.startswith(gauge)
    ] == [expiry]


def test_rewriting_plain_files_one_by_one_fails_no_request(tmp_path: Path) -> None:
    # `sidemesh ca serving-cert` writes tls.key then tls.crt, each atomically: between the two
    # the pair does not match, and the server must keep the old pair until both are there.
    with https_webhook(tmp_path / "pki") as running, Load(running) as load:
        for _ in range(3):
            cert_pem, key_pem = new_pair(running.cert_dir)
            wait_for(lambda: load.ok >= 10)
            write_serving_pair(running.cert_dir, cert_pem, key_pem)
            wait_for(lambda pem=cert_pem: served_cert(running) == der(pem))  # type: ignore[misc]
    assert load.failures == []
    assert running.tls.reloads >= 3


def test_a_half_written_pair_keeps_the_old_certificate_until_it_is_complete(
    tmp_path: Path,
) -> None:
    with https_webhook(tmp_path / "pki") as running:
        old = served_cert(running)
        cert_pem, key_pem = new_pair(running.cert_dir)
        write_atomic(running.cert_dir / TLS_KEY, key_pem.encode(), mode=0o600)
        # new key, old cert: they do not match; handshakes go on with the old pair
        for _ in range(3):
            assert served_cert(running) == old
        with running.client() as client:
            assert client.post("/mutate", json=admission_review(simple_pod())).status_code == 200
            text = client.get("/metrics").text
        assert 'sidemesh_serving_cert_reloads_total{result="failure"}' in text
        write_atomic(running.cert_dir / TLS_CERT, cert_pem.encode(), mode=0o644)
        assert served_cert(running) == der(cert_pem)


def test_connections_opened_before_a_rotation_keep_working(
    running: Running, secret: SecretVolume
) -> None:
    with running.client() as client:
        assert client.post("/mutate", json=admission_review(simple_pod())).status_code == 200
        secret.swap(*new_pair(secret.ca_dir))
        served_cert(running)  # a new handshake picks up the new pair
        for _ in range(5):
            r = client.post("/mutate", json=admission_review(simple_pod()))
            assert r.status_code == 200


def test_the_check_interval_limits_how_often_files_are_looked_at(tmp_path: Path) -> None:
    from webhook.ca.serving import ensure_dev_pki
    from webhook.server.tlsreload import ReloadingTLS

    ensure_dev_pki(tmp_path, now=datetime.now(UTC))
    now = [100.0]
    tls = ReloadingTLS(
        tmp_path / TLS_CERT, tmp_path / TLS_KEY, check_interval=5, clock=lambda: now[0]
    )
    write_serving_pair(tmp_path, *new_pair(tmp_path))
    ctx = ssl.create_default_context(cafile=str(tmp_path / CA_CERT))

    def handshake() -> bytes:
        """One in-memory handshake against the front context; the cert the client saw."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        server = tls.front.wrap_bio(incoming, outgoing, server_side=True)
        client_in, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = ctx.wrap_bio(client_in, client_out, server_hostname="127.0.0.1")
        for _ in range(10):
            for side in (client, server):
                with contextlib.suppress(ssl.SSLWantReadError):
                    side.do_handshake()
            incoming.write(client_out.read())
            client_in.write(outgoing.read())
        peer = client.getpeercert(binary_form=True)
        assert peer is not None
        return peer

    first = handshake()
    now[0] += 4
    assert handshake() == first and tls.reloads == 0  # within the interval: not looked at
    now[0] += 2
    assert handshake() == der((tmp_path / TLS_CERT).read_bytes()) != first
    assert tls.reloads == 1
