"""``sidemesh serve`` as a user runs it: a real process on 127.0.0.1, real HTTPS, its log in a
file; plus raw TLS sockets for clients that misbehave below HTTP, and the process's RSS."""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.conftest import REPO
from tests.support.ports import free_port
from tests.support.webhook_https import client_ssl

__all__ = ["SIDEMESH", "Serve", "assert_no_unexpected_errors", "metric_value", "rss_kib", "serving"]

#: The CLI as a child process, from the checkout under test.
SIDEMESH = [sys.executable, "-m", "webhook"]


def rss_kib(pid: int) -> int:
    """Resident memory of a process (``VmRSS``), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` with these labels in Prometheus text (0 if none)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Serve:
    """A `sidemesh serve` process; its stderr (JSON log lines) goes to a file."""

    def __init__(self, tmp: Path, *args: str, shutdown_delay: float = 0) -> None:
        self.port = free_port()
        self.cert_dir = tmp / "certs"
        self.log = tmp / "serve.log"
        self.url = f"https://127.0.0.1:{self.port}"
        cmd = [*SIDEMESH, "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--cert-dir", str(self.cert_dir), "--shutdown-delay", str(shutdown_delay), *args]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log)

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            if (self.cert_dir / "ca.crt").exists():
                try:
                    with self.client() as c:
                        if c.get("/readyz").status_code == 200:
                            return
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
        raise AssertionError(f"sidemesh serve did not become ready:\n{self.log.read_text()}")

    def listeners(self) -> int:
        """How many sockets listen on the server's port (one per worker: SO_REUSEPORT)."""
        want = f"0100007F:{self.port:04X}"
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
        return sum(1 for line in lines if line.split()[1] == want and line.split()[3] == "0A")

    def wait_listening(self, count: int, timeout: float = 30) -> None:
        """Until ``count`` workers listen: /readyz answers as soon as the first one does."""
        deadline = time.monotonic() + timeout
        while self.listeners() < count:
            assert self.proc.poll() is None, self.log.read_text()
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.listeners()} of {count} workers listen:\n{self.log.read_text()}"
                )
            time.sleep(0.1)

    def client(self, timeout: float = 10) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, verify=client_ssl(self.cert_dir / "ca.crt"), timeout=timeout
        )

    def tls_socket(self, timeout: float = 10) -> ssl.SSLSocket:
        """A TLS connection to the server (handshake done), for writing raw HTTP."""
        ctx = client_ssl(self.cert_dir / "ca.crt")
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        return ctx.wrap_socket(raw, server_hostname="127.0.0.1")

    def metrics(self) -> str:
        with self.client() as c:
            return c.get("/metrics").text

    def lines(self) -> list[dict[str, object]]:
        out = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def serving(directory: Path, *flags: str) -> Iterator[Serve]:
    """A ready ``sidemesh serve`` (cert dir in ``directory``), killed on the way out."""
    s = Serve(directory, *flags)
    try:
        s.wait_ready()
        yield s
    finally:
        s.kill()


def assert_no_unexpected_errors(server: Serve) -> None:
    """The server's bug counter: any exception that reached a generic handler."""
    assert metric_value(server.metrics(), "sidemesh_unexpected_errors_total") == 0
