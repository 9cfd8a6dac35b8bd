"""The dual-stack test app: meshapp's HTTP server on both address families (stdlib only).

``serve PORT...``  meshapp's server on 0.0.0.0:PORT *and* [::]:PORT for each PORT; every
    answer is one JSON line with the peer address it saw (``127.0.0.6:…`` or ``::6:…`` when
    the sidecar delivered the connection) and the ``x-forwarded-client-cert`` header.
``get HOST PORT PATH``  one request on a fresh connection; HOST may be an IPv6 literal (the
    Host header gets its brackets). Prints the answer plus the local address the client used.
"""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import sys
from pathlib import Path

# A script in a pod's namespace: make the checkout importable, then serve with meshapp's
# server, so the IPv4 and the dual-stack tests read the same answers.
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from tests.support.programs.meshapp import HttpApp


async def _serve(ports: list[int]) -> None:
    loop = asyncio.get_running_loop()
    for port in ports:
        for host in ("0.0.0.0", "::"):
            await loop.create_server(
                functools.partial(HttpApp, port), host, port, reuse_address=True
            )
    print("listening", flush=True)
    await asyncio.Event().wait()


def _get(host: str, port: int, path: str) -> dict[str, object]:
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=5) as sock:
            local = "{}:{}".format(*sock.getsockname()[:2])
            request = f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
            sock.sendall(request.encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if not head:
            return {"ok": False, "error": "closed without an answer"}
        status = int(head.split(b" ", 2)[1])
        answer = json.loads(body) if body.strip().startswith(b"{") else {"text": body.decode()}
        return {"ok": True, "status": status, "local": local, **answer}
    except (OSError, ValueError, IndexError) as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def main(argv: list[str]) -> None:
    cmd, args = argv[0], argv[1:]
    if cmd == "serve":
        asyncio.run(_serve([int(p) for p in args]))
    elif cmd == "get":
        print(json.dumps(_get(args[0], int(args[1]), args[2])), flush=True)
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv[1:])
