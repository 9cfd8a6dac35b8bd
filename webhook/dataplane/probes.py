"""The probe port (15020): the app's rewritten probes, answered by the agent.

The injector rewrites every HTTP, TCP and gRPC probe of an app container to
``GET :15020/app-health/<container>/<livez|readyz|startupz>`` and hands the original handlers to
the proxy in ``SIDEMESH_APP_PROBES``. The kubelet then calls 15020 (never captured), and this
server runs the *original* check against the app, on the pod IP, as the kubelet would have.

Why here and not in Envoy: two of the three kinds are not HTTP. A TCP probe is "can I connect",
a gRPC probe is a call to ``grpc.health.v1.Health/Check``; Envoy routes can only forward HTTP.
One small implementation for all three keeps the semantics in one place, and probe traffic is a
request every few seconds, so Python costs nothing that matters. The agent runs as uid 1337, so
its connections to the app are not captured: the app sees the probe as it would without mesh.

Answers: 200 when the check passes (an HTTP status 200-399 from the app, a TCP connect, a gRPC
``SERVING``), otherwise the app's own HTTP status, or 503 when the app cannot be reached; 404
for a path that names no probe.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Page", "ProbeResult", "parse_probes", "run_probe", "start_probe_server"]

LOG = logging.getLogger("sidemesh.proxy")

ProbeResult = tuple[int, str]
#: A page the agent serves besides the probes: query string → (status, Prometheus text).
Page = Callable[[str], tuple[int, str]]


def parse_probes(raw: str) -> dict[str, dict[str, Any]]:
    """``SIDEMESH_APP_PROBES`` → ``{path: handler}``; ``ValueError`` on anything malformed."""
    if not raw.strip():
        return {}
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object of path -> probe handler")
    out: dict[str, dict[str, Any]] = {}
    for path, probe in data.items():
        if not isinstance(probe, dict) or not ({"httpGet", "tcpSocket", "grpc"} & probe.keys()):
            raise ValueError(f"probe {path!r} has no httpGet, tcpSocket or grpc handler")
        out[str(path)] = probe
    return out


def run_probe(probe: Mapping[str, Any], pod_ip: str) -> ProbeResult:
    """Run one original probe handler against the app; returns (status for the kubelet, why)."""
    timeout = float(probe.get("timeoutSeconds") or 1)
    try:
        if "httpGet" in probe:
            return _http(probe["httpGet"], pod_ip, timeout)
        if "tcpSocket" in probe:
            tcp = probe["tcpSocket"]
            with socket.create_connection((tcp.get("host") or pod_ip, int(tcp["port"])), timeout):
                return 200, "tcp connect ok"
        grpc = probe["grpc"]
        return _grpc(pod_ip, int(grpc["port"]), str(grpc.get("service") or ""), timeout)
    except (OSError, http.client.HTTPException) as exc:
        return 503, f"app unreachable: {exc}"


def _http(get: Mapping[str, Any], pod_ip: str, timeout: float) -> ProbeResult:
    host = get.get("host") or pod_ip
    port = int(get["port"])
    conn: http.client.HTTPConnection
    if str(get.get("scheme", "HTTP")).upper() == "HTTPS":
        # The kubelet does not verify an app's certificate either.
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    headers = {"User-Agent": "kube-probe/sidemesh", "Accept": "*/*"}
    for header in get.get("httpHeaders") or []:
        headers[str(header["name"])] = str(header["value"])
    try:
        conn.request("GET", str(get.get("path") or "/"), headers=headers)
        resp = conn.getresponse()
        resp.read(1024)
    finally:
        conn.close()
    if 200 <= resp.status < 400:
        return 200, f"app answered {resp.status}"
    return resp.status, f"app answered {resp.status}"


# --- gRPC health check over cleartext HTTP/2, just enough of it ---------------------------
# A gRPC probe is one unary call to grpc.health.v1.Health/Check. Without a gRPC library in
# the image, we speak the few frames it needs: the client preface, SETTINGS, a HEADERS frame
# with literal (never Huffman, never indexed) header fields, and one DATA frame; the answer's
# DATA frame carries HealthCheckResponse{status}; SERVING is 1.

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


def _literal(name: str, value: str) -> bytes:
    def s(text: str) -> bytes:
        raw = text.encode()
        assert len(raw) < 127
        return bytes([len(raw)]) + raw

    return b"\x00" + s(name) + s(value)  # literal header field without indexing, new name


def _grpc(host: str, port: int, service: str, timeout: float) -> ProbeResult:
    svc = service.encode()
    message = (b"\x0a" + bytes([len(svc)]) + svc) if svc else b""
    headers = b"".join(
        _literal(k, v)
        for k, v in (
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/grpc.health.v1.Health/Check"),
            (":authority", f"[{host}]:{port}" if ":" in host else f"{host}:{port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        )
    )
    body = b"\x00" + struct.pack(">I", len(message)) + message
    with socket.create_connection((host, port), timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(
            _PREFACE
            + _frame(0x4, 0, 0, b"")  # SETTINGS
            + _frame(0x1, 0x4, 1, headers)  # HEADERS, END_HEADERS
            + _frame(0x0, 0x1, 1, body)  # DATA, END_STREAM
        )
        buf = b""
        while True:
            while len(buf) < 9:
                chunk = sock.recv(4096)
                if not chunk:
                    return 503, "gRPC server closed the connection without an answer"
                buf += chunk
            length = int.from_bytes(buf[:3], "big")
            kind, flags, stream = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            while len(buf) < 9 + length:
                chunk = sock.recv(4096)
                if not chunk:
                    return 503, "gRPC answer truncated"
                buf += chunk
            payload, buf = buf[9 : 9 + length], buf[9 + length :]
            if kind == 0x4 and not flags & 0x1:  # their SETTINGS: acknowledge
                sock.sendall(_frame(0x4, 0x1, 0, b""))
            elif kind == 0x7 or (kind == 0x3 and stream == 1):  # GOAWAY / RST_STREAM
                return 503, "gRPC server refused the health check"
            elif kind == 0x0 and stream == 1 and len(payload) >= 5:
                msg = payload[5:]
                status = msg[1] if len(msg) >= 2 and msg[0] == 0x08 else 0
                if status == 1:
                    return 200, "gRPC SERVING"
                return 503, f"gRPC health status {status}"
            elif kind == 0x1 and stream == 1 and flags & 0x1:  # trailers-only: an error
                return 503, "gRPC health check failed (no response message)"


class _Handler(BaseHTTPRequestHandler):
    server: _ProbeServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        page = self.server.pages.get(path)
        if page is not None:
            status, text = page(query)
            self._send(status, text, "text/plain; version=0.0.4" if status == 200 else "text/plain")
            return
        probe = self.server.probes.get(path)
        if probe is None:
            status, why = 404, "no such probe"
        else:
            status, why = run_probe(probe, self.server.pod_ip)
            if status != 200:
                LOG.info("probe %s failed: %s", self.path, why)
        self._send(status, why + "\n")

    def _send(self, status: int, text: str, content_type: str = "text/plain") -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the kubelet's probe every few seconds is not news


class _ProbeServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        probes: dict[str, dict[str, Any]],
        pod_ip: str,
        pages: Mapping[str, Page],
    ):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.probes = probes
        self.pod_ip = pod_ip
        self.pages = pages

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # "::" serves both families: a dual-stack pod's kubelet may probe either address
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def start_probe_server(
    probes: dict[str, dict[str, Any]],
    *,
    pod_ip: str,
    port: int,
    host: str = "0.0.0.0",
    pages: Mapping[str, Page] | None = None,
) -> ThreadingHTTPServer:
    """Serve the probes on ``host:port`` in a daemon thread; ``shutdown()`` stops it.
    ``host="::"`` serves IPv4 and IPv6 on one socket. ``pages``: path → what answers it (the
    agent's metrics), given the query string."""
    server = _ProbeServer((host, port), probes, pod_ip, pages or {})
    # a short poll interval: shutdown() waits for it, and SIGTERM must end the agent promptly
    threading.Thread(target=server.serve_forever, args=(0.1,), name="probes", daemon=True).start()
    return server
