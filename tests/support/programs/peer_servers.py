"""A stand-in "API server" and "kube-dns" that answer with the peer address they saw.

``python peer_servers.py CERT KEY TLS_PORTS TCP_PORTS`` (ports comma-separated; ports below
1024 need root). TLS ports: read one line, answer ``{"peer": "HOST:PORT"}``. TCP ports: one
DNS-over-TCP style frame (2-byte length + message) in, one frame out with the same JSON.
Every port listens on both address families. Prints ``listening`` once all are bound.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import sys
import threading
from collections.abc import Callable


def peer_of(conn: socket.socket) -> bytes:
    host, port = conn.getpeername()[:2]
    host = host.removeprefix("::ffff:")  # IPv4 on the dual-stack socket
    return json.dumps({"peer": f"{host}:{port}"}).encode()


def tls_one(ctx: ssl.SSLContext, conn: socket.socket) -> None:
    try:
        with ctx.wrap_socket(conn, server_side=True) as s:
            s.settimeout(5)
            s.recv(1024)
            s.sendall(peer_of(s) + b"\n")
    except OSError:
        conn.close()


def tcp_one(conn: socket.socket) -> None:
    with conn:
        conn.settimeout(5)
        try:
            buf = b""
            while len(buf) < 2 or len(buf) < 2 + struct.unpack("!H", buf[:2])[0]:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                buf += chunk
            answer = peer_of(conn)
            conn.sendall(struct.pack("!H", len(answer)) + answer)
        except OSError:
            pass


def serve(port: int, handler: Callable[[socket.socket], None]) -> None:
    srv = socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True)

    def loop() -> None:
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()


def main(argv: list[str]) -> None:
    cert, key, tls_ports, tcp_ports = argv[:4]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    for p in tls_ports.split(","):
        serve(int(p), lambda conn: tls_one(ctx, conn))
    for p in tcp_ports.split(","):
        serve(int(p), tcp_one)
    print("listening", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1:])
