"""The test app of the data-plane test and benchmark (stdlib only: any uid can run it).

``serve PORT...``  an HTTP/1.1 keep-alive server on 0.0.0.0:PORT for each PORT. Every answer is
    one JSON line: the port, the peer address it saw (127.0.0.6 when the sidecar delivered the
    connection, the caller's own address when nothing was in between), and the
    ``x-forwarded-client-cert`` header (the caller's SPIFFE id, set by the sidecar) or null.
    ``/ready`` answers 200, ``/fail`` 500. Nagle is off and each answer is one write: Python's
    stock ``http.server`` with keep-alive waits on Nagle + delayed ACK for every request.
``get HOST PORT PATH [HEADER]``  one request (plus one raw header line) on a fresh connection;
    prints the answer plus the local address the client used, so a test can tell a direct
    connection (the server saw exactly that address) from a proxied one.
``stream HOST PORT SECONDS``  a new connection per request for SECONDS; prints a summary:
    successes, failures (with reasons) and the distinct ``x-forwarded-client-cert`` values seen.
``hold HOST PORT FILE``  one request, then keep the connection open until FILE exists.
``count HOST PORT N``  N requests on fresh connections; answers per replica (``POD_NAME``).
``keepalive HOST PORT N``  N requests on one keep-alive connection; answers per replica.
``hits HOST PORT PATH N [HEADER]``  N requests to PATH, each on a new connection (plus one raw
    header line, e.g. a ``traceparent``); prints how many answers came with each status.
``serve-banner PORT...``  a server-first protocol: a greeting line on connect, then echo.
``banner HOST PORT``  connect, print the server's greeting and how long it took to come.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import socket
import sys
import time
from typing import Any


class HttpApp(asyncio.Protocol):
    def __init__(self, port: int) -> None:
        self.port = port
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.peer = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        host, port = transport.get_extra_info("peername")[:2]
        self.peer = f"{host}:{port}"

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, rest = self.buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _version = [*lines[0].split(" "), "", ""][:3]
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0") or 0)
            if len(rest) < length:
                return
            self.buf = rest[length:]
            self.respond(method, path, headers)

    def respond(self, method: str, path: str, headers: dict[str, str]) -> None:
        status = {"/fail": "500 Internal Server Error"}.get(path, "200 OK")
        body = (
            json.dumps(
                {
                    "port": self.port,
                    "peer": self.peer,
                    "xfcc": headers.get("x-forwarded-client-cert"),
                    "path": path,
                    "method": method,
                    # Which replica answered (the pod's POD_NAME, when its spec sets one).
                    "pod": os.environ.get("POD_NAME"),
                }
            ).encode()
            + b"\n"
        )
        close = headers.get("connection", "").lower() == "close"
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n" + ("Connection: close\r\n" if close else "") + "\r\n"
        )
        assert self.transport is not None
        self.transport.write(head.encode() + body)
        if close:
            self.transport.close()


async def _serve(ports: list[int]) -> None:
    loop = asyncio.get_running_loop()
    for port in ports:
        await loop.create_server(
            functools.partial(HttpApp, port), "0.0.0.0", port, reuse_address=True
        )
    print("listening", flush=True)
    await asyncio.Event().wait()


def _request(
    host: str, port: int, path: str, keep: bool = False, extra: str = ""
) -> tuple[dict[str, Any], socket.socket]:
    sock = socket.create_connection((host, port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    local = "{}:{}".format(*sock.getsockname()[:2])
    conn = "keep-alive" if keep else "close"
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: {conn}\r\n"
    sock.sendall((request + (f"{extra}\r\n" if extra else "") + "\r\n").encode())
    return _read_answer(sock, local), sock


def _read_answer(sock: socket.socket, local: str) -> dict[str, Any]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed without an answer after {len(data)} bytes")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.decode("latin-1").split("\r\n")[1:]:
        if line.lower().startswith("content-length:"):
            length = int(line.split(":", 1)[1])
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("answer truncated")
        body += chunk
    status = int(head.split(b" ", 2)[1])
    answer = json.loads(body) if body.strip().startswith(b"{") else {"text": body.decode()}
    return {"status": status, "local": local, **answer}


def _get(host: str, port: int, path: str, extra: str = "") -> dict[str, Any]:
    try:
        answer, sock = _request(host, port, path, extra=extra)
        sock.close()
        return {"ok": True, **answer}
    except (OSError, ValueError) as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def _stream(host: str, port: int, seconds: float) -> dict[str, Any]:
    ok, failures, xfcc = 0, [], set()
    pods: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = _get(host, port, "/stream")
        if result["ok"] and result["status"] == 200:
            ok += 1
            xfcc.add(result.get("xfcc"))
            pod = str(result.get("pod"))
            pods[pod] = pods.get(pod, 0) + 1
        else:
            failures.append(result.get("error") or result.get("status"))
        time.sleep(0.02)
    summary = {"ok": ok, "failures": failures, "xfcc": sorted(str(x) for x in xfcc)}
    return {**summary, "pods": pods}


def _count(host: str, port: int, n: int) -> dict[str, Any]:
    """``n`` requests, each on a new connection: answers per replica, with what each saw."""
    pods: dict[str, int] = {}
    seen: dict[str, list[Any]] = {}
    failures = []
    for _ in range(n):
        result = _get(host, port, "/count")
        if not (result["ok"] and result["status"] == 200):
            failures.append(result.get("error") or result.get("status"))
            continue
        pod = str(result.get("pod"))
        pods[pod] = pods.get(pod, 0) + 1
        seen[pod] = [result.get("xfcc"), result.get("peer") == result.get("local")]
    return {"pods": pods, "seen": seen, "failures": failures}


def _keepalive(host: str, port: int, n: int) -> dict[str, Any]:
    """``n`` requests on one connection (reopened only if the far side closes it)."""
    pods: dict[str, int] = {}
    failures: list[str] = []
    connections = 0
    sock: socket.socket | None = None
    for _ in range(n):
        try:
            if sock is None:
                connections += 1
                answer, sock = _request(host, port, "/keepalive", keep=True)
            else:
                answer = _on(sock, host, port, "/keepalive")
        except (OSError, ValueError) as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
            sock = None
            continue
        pod = str(answer.get("pod"))
        pods[pod] = pods.get(pod, 0) + 1
    if sock is not None:
        sock.close()
    return {"pods": pods, "failures": failures, "connections": connections}


def _on(sock: socket.socket, host: str, port: int, path: str) -> dict[str, Any]:
    """Another request on an open keep-alive connection."""
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n"
    sock.sendall(request.encode())
    return _read_answer(sock, "")


def _hits(host: str, port: int, path: str, n: int, extra: str = "") -> dict[str, Any]:
    codes: dict[str, int] = {}
    errors = []
    for _ in range(n):
        result = _get(host, port, path, extra)
        if result["ok"]:
            codes[str(result["status"])] = codes.get(str(result["status"]), 0) + 1
        else:
            errors.append(result["error"])
    return {"codes": codes, "errors": errors}


class _Banner(asyncio.Protocol):
    """A server-first protocol: greets at once (like MySQL or SMTP), then echoes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(f"220 {os.environ.get('POD_NAME')} ready\r\n".encode())

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def _serve_banner(ports: list[int]) -> None:
    loop = asyncio.get_running_loop()
    for port in ports:
        await loop.create_server(_Banner, "0.0.0.0", port, reuse_address=True)
    print("listening", flush=True)
    await asyncio.Event().wait()


def _banner(host: str, port: int) -> dict[str, Any]:
    """Connect and wait for the server to speak first: its greeting and how long it took."""
    start = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=5) as sock:
            greeting = sock.recv(256).decode(errors="replace").strip()
    except OSError as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": bool(greeting), "greeting": greeting, "seconds": time.monotonic() - start}


def _hold(host: str, port: int, flag: str) -> None:
    answer, sock = _request(host, port, "/hold", keep=True)
    print(json.dumps({"held": True, **answer}), flush=True)
    while not os.path.exists(flag):
        time.sleep(0.05)
    sock.close()
    print("closed", flush=True)


def main(argv: list[str]) -> None:
    cmd, args = argv[0], argv[1:]
    if cmd == "serve":
        asyncio.run(_serve([int(p) for p in args]))
    elif cmd == "get":
        extra = args[3] if len(args) > 3 else ""
        print(json.dumps(_get(args[0], int(args[1]), args[2], extra)), flush=True)
    elif cmd == "stream":
        print(json.dumps(_stream(args[0], int(args[1]), float(args[2]))), flush=True)
    elif cmd == "hold":
        _hold(args[0], int(args[1]), args[2])
    elif cmd == "count":
        print(json.dumps(_count(args[0], int(args[1]), int(args[2]))), flush=True)
    elif cmd == "keepalive":
        print(json.dumps(_keepalive(args[0], int(args[1]), int(args[2]))), flush=True)
    elif cmd == "hits":
        extra = args[4] if len(args) > 4 else ""
        print(json.dumps(_hits(args[0], int(args[1]), args[2], int(args[3]), extra)), flush=True)
    elif cmd == "serve-banner":
        asyncio.run(_serve_banner([int(p) for p in args]))
    elif cmd == "banner":
        print(json.dumps(_banner(args[0], int(args[1]))), flush=True)
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv[1:])
