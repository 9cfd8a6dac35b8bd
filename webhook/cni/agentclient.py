"""The plugin's half of the pod look-up: ask the node agent over its Unix socket.

Standard library only (socket and json): the plugin runs once per pod sandbox, so what it
imports is paid on every pod of the node. The node agent (``sidemesh cni install``, a
long-running process that already holds the API client and its credentials) answers; the
plugin itself holds no credential and never talks to the API server.

The exchange is one JSON line each way on a fresh connection::

    → {"namespace": "demo", "name": "web-0"}
    ← {"annotations": {...}}        or   {"error": {"code": 11, "msg": "...", "details": ""}}

An agent that cannot be reached, or answers nonsense, is an error ("try again later"), never
"not injected": a meshed pod must not start without its capture.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from webhook.cni.spec import ERR_TRY_AGAIN, CNIError

__all__ = ["MAX_REPLY", "read_annotations"]

#: A reply larger than this is refused (annotations are capped at 256 KiB by the API server).
MAX_REPLY = 1 << 20


def _exchange(path: str, request: bytes, timeout: float) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(path)
        conn.sendall(request)
        conn.shutdown(socket.SHUT_WR)
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > MAX_REPLY:
                raise ValueError(f"reply larger than {MAX_REPLY} bytes")
            chunks.append(chunk)


def read_annotations(path: str, namespace: str, name: str, *, timeout: float) -> dict[str, str]:
    """The pod's annotations, from the node agent at ``path``; ``CNIError`` when the agent or
    (as it reports) the API server cannot tell."""
    where = f"pod {namespace}/{name}"
    request = (json.dumps({"namespace": namespace, "name": name}) + "\n").encode()
    try:
        raw = _exchange(path, request, timeout)
    except (OSError, ValueError) as exc:
        raise CNIError(
            ERR_TRY_AGAIN,
            f"sidemesh: cannot reach the node agent at {path} to look up {where}; the pod's "
            "sandbox is not created, so that no meshed pod starts without its traffic capture "
            "(is the sidemesh-cni DaemonSet pod running on this node?)",
            f"{type(exc).__name__}: {exc}",
        ) from None
    try:
        reply: Any = json.loads(raw)
    except ValueError:
        reply = None
    if isinstance(reply, dict) and isinstance(reply.get("error"), dict):
        error = reply["error"]
        code = error.get("code")
        raise CNIError(
            code if isinstance(code, int) and not isinstance(code, bool) else ERR_TRY_AGAIN,
            str(error.get("msg", "sidemesh: the node agent failed")),
            str(error.get("details", "")),
        )
    annotations = reply.get("annotations") if isinstance(reply, dict) else None
    if not isinstance(annotations, dict):
        raise CNIError(ERR_TRY_AGAIN, f"sidemesh: the node agent gave no usable answer for {where}")
    return {str(k): str(v) for k, v in annotations.items()}
