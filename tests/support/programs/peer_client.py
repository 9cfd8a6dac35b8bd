"""The client app for :mod:`peer_servers`: one connection, one JSON line on stdout.

``python peer_client.py tls HOST PORT CAFILE``  TLS verified against CAFILE; the answer
    carries the peer the server saw and the TLS version.
``python peer_client.py dns HOST PORT``  one DNS-over-TCP style frame.
Every answer has ``ok`` and the ``local`` address the client used, or an ``error``.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import sys
from typing import Any

#: A minimal DNS query header; the stand-in only frames it, it never parses it.
QUERY = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"


def ask(mode: str, host: str, port: int, cafile: str | None, out: dict[str, Any]) -> None:
    with socket.create_connection((host, port), timeout=5) as raw:
        out["local"] = "{}:{}".format(*raw.getsockname()[:2])
        if mode == "tls":
            ctx = ssl.create_default_context(cafile=cafile)
            with ctx.wrap_socket(raw, server_hostname=host) as s:
                out["version"] = s.version()
                s.sendall(b"GET\n")
                out.update(json.loads(s.recv(4096)))
            return
        raw.sendall(struct.pack("!H", len(QUERY)) + QUERY)
        data = b""
        while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
            chunk = raw.recv(4096)
            if not chunk:
                raise ConnectionError("closed before the answer")
            data += chunk
        out.update(json.loads(data[2:]))


def main(argv: list[str]) -> None:
    mode, host, port = argv[0], argv[1], int(argv[2])
    out: dict[str, Any] = {"ok": False}
    try:
        ask(mode, host, port, argv[3] if len(argv) > 3 else None, out)
        out["ok"] = True
    except Exception as exc:  # every failure is an answer the test reads
        out["error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
