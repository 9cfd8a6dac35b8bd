"""A real ``redis-server`` for a test: its own port, its own directory, stopped by its PID."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import require
from tests.support.ports import free_port

__all__ = ["RedisServer", "redis_argv", "redis_server"]


def redis_argv(port: int, directory: Path, bind: str = "127.0.0.1") -> list[str]:
    """No persistence, no daemon: the test owns the process and its directory."""
    binary = shutil.which("redis-server")
    require(binary is not None, "needs redis-server (Debian package redis-server)")
    assert binary is not None
    return [binary, "--port", str(port), "--bind", bind, "--dir", str(directory),
            "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--protected-mode", "no"]  # fmt: skip


@dataclass
class RedisServer:
    port: int
    directory: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, argv: Sequence[str] | None = None) -> None:
        self.proc = subprocess.Popen(
            list(argv or redis_argv(self.port, self.directory)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@contextmanager
def redis_server() -> Iterator[RedisServer]:
    with tempfile.TemporaryDirectory(prefix="sidemesh-redis-") as tmp:
        server = RedisServer(free_port(), Path(tmp))
        server.start()
        try:
            yield server
        finally:
            server.stop()
