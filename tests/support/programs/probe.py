"""A client for :mod:`listener`: one connection, the listener's line, one JSON line out.

``python probe.py HOST PORT [SOURCE]``  connects (from SOURCE when given) and prints
``{"ok": true, ...the listener's reply}`` or ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import json
import socket
import sys
from typing import Any


def probe(host: str, port: int, source: str) -> dict[str, Any]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(3)
        if source:
            sock.bind((source, 0))
        sock.connect((host, port))
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        sock.close()
        return dict(json.loads(data), ok=True) if data else {"ok": False, "error": "no reply"}
    except OSError as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def main(argv: list[str]) -> None:
    print(json.dumps(probe(argv[0], int(argv[1]), argv[2] if len(argv) > 2 else "")))


if __name__ == "__main__":
    main(sys.argv[1:])
