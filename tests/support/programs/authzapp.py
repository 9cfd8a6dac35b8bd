"""Callers for the access-policy and rate-limit tests (stdlib only: any uid can run it).

``tcp HOST PORT``  connect, send ``ping\\n``, read for up to 2 s: prints whether the echo came
    back (a connection the server's sidecar denied is closed before it does).
``http HOST PORT PATH [METHOD] [HEADER: VALUE]``  one request on a fresh connection: status and
    body (a denial's body names the policy).
``loop HOST PORT SECONDS``  requests on ONE keep-alive connection for SECONDS (a new
    connection only when the server closes it): prints successes, failures and reconnects.
``burst HOST PORT N [HEADER: VALUE]``  N requests, each on a fresh connection: status counts.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from typing import Any


def _tcp(host: str, port: int) -> dict[str, Any]:
    try:
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(b"ping\n")
            sock.settimeout(2)
            data = b""
            deadline = time.monotonic() + 2
            while b"ping" not in data and time.monotonic() < deadline:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        return {"echoed": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"echoed": b"ping" in data, "got": data.decode(errors="replace")}


def _read_answer(sock: socket.socket) -> tuple[int, str, bool]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed without an answer after {len(data)} bytes")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length, close = 0, False
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.lower() == "content-length":
            length = int(value)
        if name.lower() == "connection" and value.strip().lower() == "close":
            close = True
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("answer truncated")
        body += chunk
    return int(head.split(b" ", 2)[1]), body.decode(errors="replace"), close


def _request(
    sock: socket.socket, host: str, port: int, path: str, method: str = "GET", extra: str = ""
) -> tuple[int, str, bool]:
    req = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}\r\n"
    sock.sendall(req.encode())
    return _read_answer(sock)


def _connect(host: str, port: int) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _http(host: str, port: int, path: str, method: str, header: str) -> dict[str, Any]:
    extra = f"{header}\r\n" if header else ""
    try:
        with _connect(host, port) as sock:
            status, body, _ = _request(
                sock, host, port, path, method, extra + "Connection: close\r\n"
            )
    except OSError as exc:
        return {"status": 0, "error": f"{type(exc).__name__}: {exc}"}
    return {"status": status, "body": body}


def _loop(host: str, port: int, seconds: float) -> dict[str, Any]:
    ok, connects = 0, 0
    failures: list[int | str] = []
    sock: socket.socket | None = None
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if sock is None:
                sock = _connect(host, port)
                connects += 1
            status, _body, close = _request(sock, host, port, "/loop")
            if status == 200:
                ok += 1
            else:
                failures.append(status)
            if close:
                sock.close()
                sock = None
        except OSError as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
            if sock is not None:
                sock.close()
            sock = None
        time.sleep(0.01)
    if sock is not None:
        sock.close()
    return {"ok": ok, "failures": failures, "connections": connects}


def _burst(host: str, port: int, n: int, header: str) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for _ in range(n):
        answer = _http(host, port, "/burst", "GET", header)
        key = str(answer["status"])
        counts[key] = counts.get(key, 0) + 1
    return {"statuses": counts}


def main(argv: list[str]) -> None:
    cmd, args = argv[0], argv[1:]
    if cmd == "tcp":
        out = _tcp(args[0], int(args[1]))
    elif cmd == "http":
        method = args[3] if len(args) > 3 else "GET"
        header = args[4] if len(args) > 4 else ""
        out = _http(args[0], int(args[1]), args[2], method, header)
    elif cmd == "loop":
        out = _loop(args[0], int(args[1]), float(args[2]))
    elif cmd == "burst":
        out = _burst(args[0], int(args[1]), int(args[2]), args[3] if len(args) > 3 else "")
    else:
        raise SystemExit(f"unknown command {cmd}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
