"""The test app for protocols other than HTTP/1.1 (runs under the venv's interpreter: h2, grpcio).

``serve PORT...``  on each PORT, HTTP/1.x *and* HTTP/2 with prior knowledge (h2c) on the same
    socket, told apart by the HTTP/2 connection preface, as h2c servers do; a gRPC server on
    :data:`GRPC_PORT`; a line echo (not HTTP) on :data:`TCP_PORT`. Every answer is one JSON
    object: the port, the protocol the app saw, the peer address (127.0.0.6 when a sidecar
    delivered it) and the ``x-forwarded-client-cert`` header (null when none).
``tcp HOST PORT``  one line to the echo; prints what came back.
``grpc HOST PORT N [XFCC]``  one unary call and one server-streaming call of N messages (with
    a forged ``x-forwarded-client-cert`` when XFCC is given); prints one JSON line: both
    answers, or the gRPC status code and details of the failure.
``grpc-spread HOST PORT N``  N unary calls on one channel (one HTTP/2 connection); prints how
    many each replica (its ``POD_NAME``) answered, and the failures.

The gRPC service needs no generated code: generic handlers on raw bytes (JSON inside).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import socket
import sys
from concurrent import futures
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events

GRPC_PORT = 50051
#: A line echo: any TCP protocol the outbound side does not recognise as HTTP.
TCP_PORT = 7000
SERVICE = "sidemesh.test.Echo"
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _answer(port: int, proto: str, peer: str, headers: dict[str, str], path: str) -> bytes:
    body = {
        "port": port,
        "proto": proto,
        "peer": peer,
        "xfcc": headers.get("x-forwarded-client-cert"),
        "path": path,
    }
    return json.dumps(body).encode() + b"\n"


class _Server(asyncio.Protocol):
    """HTTP/1.x until the first bytes are the HTTP/2 preface; then an h2 connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.buf = b""
        self.peer = ""
        self.transport: asyncio.Transport | None = None
        self.h2: h2.connection.H2Connection | None = None
        self.streams: dict[int, dict[str, str]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        host, port = transport.get_extra_info("peername")[:2]
        self.peer = f"{host}:{port}"

    def data_received(self, data: bytes) -> None:
        if self.h2 is not None:
            self._h2_data(data)
            return
        self.buf += data
        if self.buf.startswith(_PREFACE[: len(self.buf)]):
            if len(self.buf) < len(_PREFACE):
                return  # maybe the preface: wait for the rest
            config = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
            self.h2 = h2.connection.H2Connection(config=config)
            self.h2.initiate_connection()
            data, self.buf = self.buf, b""
            self._h2_data(data)
            return
        self._http1()

    def _http1(self) -> None:
        assert self.transport is not None
        while b"\r\n\r\n" in self.buf:
            head, _, rest = self.buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            _method, path, version = [*lines[0].split(" "), "", ""][:3]
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0") or 0)
            if len(rest) < length:
                return
            self.buf = rest[length:]
            body = _answer(self.port, version, self.peer, headers, path)
            close = version == "HTTP/1.0" or headers.get("connection", "").lower() == "close"
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n".encode()
                + (b"Connection: close\r\n" if close else b"")
                + b"\r\n"
                + body
            )
            if close:
                self.transport.close()
                return

    def _h2_data(self, data: bytes) -> None:
        assert self.h2 is not None and self.transport is not None
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                self.streams[event.stream_id] = {str(k): str(v) for k, v in event.headers}
            elif isinstance(event, h2.events.DataReceived):
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                headers = self.streams.pop(event.stream_id, {})
                body = _answer(self.port, "HTTP/2", self.peer, headers, headers.get(":path", ""))
                self.h2.send_headers(
                    event.stream_id,
                    [
                        (":status", "200"),
                        ("content-type", "application/json"),
                        ("content-length", str(len(body))),
                    ],
                )
                self.h2.send_data(event.stream_id, body, end_stream=True)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.transport.close()
        self.transport.write(self.h2.data_to_send())


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        host, port = transport.get_extra_info("peername")[:2]
        self.peer = f"{host}:{port}"

    def data_received(self, data: bytes) -> None:
        line = data.decode(errors="replace").strip()
        self.transport.write(json.dumps({"peer": self.peer, "line": line}).encode() + b"\n")


def _tcp_client(host: str, port: int) -> dict[str, Any]:
    try:
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(b"ping\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        return {"ok": True, **json.loads(data)}
    except (OSError, ValueError) as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def _grpc_seen(context: grpc.ServicerContext) -> dict[str, Any]:
    metadata = dict(context.invocation_metadata())
    return {
        "peer": context.peer(),
        "xfcc": metadata.get("x-forwarded-client-cert"),
        "pod": os.environ.get("POD_NAME"),
    }


def _hello(request: bytes, context: grpc.ServicerContext) -> bytes:
    return json.dumps({"hello": request.decode(), **_grpc_seen(context)}).encode()


def _count(request: bytes, context: grpc.ServicerContext) -> Any:
    seen = _grpc_seen(context)
    for i in range(int(request)):
        yield json.dumps({"i": i, **seen}).encode()


def _grpc_server() -> grpc.Server:
    handlers = {
        "Hello": grpc.unary_unary_rpc_method_handler(_hello),
        "Count": grpc.unary_stream_rpc_method_handler(_count),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port(f"0.0.0.0:{GRPC_PORT}")
    server.start()
    return server


async def _serve(ports: list[int]) -> None:
    loop = asyncio.get_running_loop()
    for port in ports:
        await loop.create_server(
            functools.partial(_Server, port), "0.0.0.0", port, reuse_address=True
        )
    await loop.create_server(_Echo, "0.0.0.0", TCP_PORT, reuse_address=True)
    server = _grpc_server()
    print("listening", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        server.stop(0)


def _grpc_client(host: str, port: int, n: int, forged: str = "") -> dict[str, Any]:
    metadata = [("x-forwarded-client-cert", forged)] if forged else None
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        try:
            unary = channel.unary_unary(f"/{SERVICE}/Hello")
            hello = unary(b"mesh", timeout=5, metadata=metadata)
            count = channel.unary_stream(f"/{SERVICE}/Count")
            stream = list(count(str(n).encode(), timeout=5, metadata=metadata))
        except grpc.RpcError as exc:
            return {"ok": False, "code": str(exc.code()), "details": exc.details()}
    return {
        "ok": True,
        "unary": json.loads(hello),
        "stream": [json.loads(m) for m in stream],
    }


def _grpc_spread(host: str, port: int, n: int) -> dict[str, Any]:
    pods: dict[str, int] = {}
    failures: list[str] = []
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        unary = channel.unary_unary(f"/{SERVICE}/Hello")
        for _ in range(n):
            try:
                pod = str(json.loads(unary(b"spread", timeout=5))["pod"])
            except grpc.RpcError as exc:
                failures.append(f"{exc.code()}: {exc.details()}")
                continue
            pods[pod] = pods.get(pod, 0) + 1
    return {"pods": pods, "failures": failures}


def main(argv: list[str]) -> None:
    cmd, args = argv[0], argv[1:]
    if cmd == "serve":
        asyncio.run(_serve([int(p) for p in args]))
    elif cmd == "tcp":
        print(json.dumps(_tcp_client(args[0], int(args[1]))), flush=True)
    elif cmd == "grpc":
        forged = args[3] if len(args) > 3 else ""
        print(json.dumps(_grpc_client(args[0], int(args[1]), int(args[2]), forged)), flush=True)
    elif cmd == "grpc-spread":
        print(json.dumps(_grpc_spread(args[0], int(args[1]), int(args[2]))), flush=True)
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv[1:])
