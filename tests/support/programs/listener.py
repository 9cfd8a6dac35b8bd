"""A listener that says where each connection landed (stdlib only: any uid can run it).

``python listener.py NAME HOST:PORT...``  one thread per address (``0.0.0.0:8080``,
``[::]:8080``). For every connection it answers one JSON line, then closes: NAME, the port
that accepted it, the peer, the local address and SO_ORIGINAL_DST (the address the client
asked for before a nat REDIRECT; equal to ``local`` when nothing was rewritten). Prints
``listening`` once every socket is bound.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading

#: From <linux/netfilter_ipv4.h>; the same number for IPv6 (IP6T_SO_ORIGINAL_DST).
SO_ORIGINAL_DST = 80


def original_dst(conn: socket.socket, family: int) -> str | None:
    try:
        if family == socket.AF_INET:
            raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            host = socket.inet_ntop(socket.AF_INET, raw[4:8])
            return f"{host}:{struct.unpack('!H', raw[2:4])[0]}"
        raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
        return f"[{host}]:{struct.unpack('!H', raw[2:4])[0]}"
    except OSError:
        return None


def addr(a: tuple[str, int] | tuple[str, int, int, int]) -> str:
    return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"


def serve(name: str, sock: socket.socket, port: int, family: int) -> None:
    while True:
        conn, peer = sock.accept()
        with conn:
            reply = {
                "name": name,
                "port": port,
                "peer": addr(peer),
                "local": addr(conn.getsockname()),
                "orig": original_dst(conn, family),
            }
            conn.sendall((json.dumps(reply) + "\n").encode())


def main(argv: list[str]) -> None:
    name, threads = argv[0], []
    for spec in argv[1:]:
        host, _, port = spec.rpartition(":")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host.strip("[]"), int(port)))
        sock.listen(64)
        args = (name, sock, int(port), family)
        t = threading.Thread(target=serve, args=args, daemon=True)
        t.start()
        threads.append(t)
    print("listening", flush=True)
    for t in threads:
        t.join()


if __name__ == "__main__":
    main(sys.argv[1:])
