"""The node agent's pod look-up service: a Unix socket the CNI plugin asks for a pod's
annotations (:mod:`webhook.cni.agentclient` is the other half, and documents the exchange).

The agent keeps one API client (the official ``kubernetes`` client, with the agent's
service-account credentials) for all look-ups, so a sandbox creation costs one HTTPS request
instead of a Python start-up with the client's imports. The credentials are read again for
each look-up (two small files) and the client is rebuilt when they changed, so a rotated token
is used at once. Nothing is cached about pods: every ADD asks the API server, as before.

The socket lives in the node's CNI config directory (already mounted into the agent), mode
0600: only root on the node — the container runtime — can connect.
"""

from __future__ import annotations

import contextlib
import json
import os
import socketserver
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from webhook.cni.agentclient import MAX_REPLY
from webhook.cni.spec import ERR_INVALID_ENV, ERR_TRY_AGAIN, CNIError
from webhook.errors import SidemeshError

__all__ = ["LookupServer", "serve"]

_REQUEST_LIMIT = 4096
_READ_TIMEOUT = 5.0


def _answer(raw: bytes, lookup: Callable[[str, str], dict[str, str]]) -> dict[str, Any]:
    try:
        request = json.loads(raw)
        namespace, name = request["namespace"], request["name"]
        if not (isinstance(namespace, str) and isinstance(name, str) and namespace and name):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        error = CNIError(ERR_INVALID_ENV, "sidemesh: the node agent got a malformed request")
    else:
        try:
            return {"annotations": lookup(namespace, name)}
        except CNIError as exc:
            error = exc
        except SidemeshError as exc:  # the credentials are unreadable, for instance
            error = CNIError(ERR_TRY_AGAIN, f"sidemesh: node agent: {exc}")
    return {"error": {"code": error.code, "msg": error.msg, "details": error.details}}


class _Handler(socketserver.StreamRequestHandler):
    server: LookupServer
    timeout = _READ_TIMEOUT

    def handle(self) -> None:
        try:
            raw = self.rfile.readline(_REQUEST_LIMIT)
        except OSError:
            return  # the plugin gave up (its own timeout)
        reply = json.dumps(_answer(raw, self.server.lookup)).encode()
        if len(reply) > MAX_REPLY:
            too_big = CNIError(ERR_TRY_AGAIN, "sidemesh: the pod's annotations are too large")
            reply = json.dumps({"error": {"code": too_big.code, "msg": too_big.msg}}).encode()
        with contextlib.suppress(OSError):
            self.wfile.write(reply + b"\n")


class LookupServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, lookup: Callable[[str, str], dict[str, str]]) -> None:
        self.lookup = lookup
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a previous agent's socket: nobody listens on it any more
        old = os.umask(0o177)  # created 0600, never briefly open to others
        try:
            super().__init__(str(path), _Handler)
        finally:
            os.umask(old)

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def serve(path: Path, lookup: Callable[[str, str], dict[str, str]]) -> LookupServer:
    """Start answering on ``path`` in a background thread; ``close()`` stops and removes it."""
    server = LookupServer(path, lookup)
    threading.Thread(target=server.serve_forever, name="cni-lookup", daemon=True).start()
    print(f"sidemesh cni: serving pod look-ups on {path}", file=sys.stderr, flush=True)
    return server
