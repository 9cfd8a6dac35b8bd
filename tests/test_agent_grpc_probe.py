"""The gRPC probe speaks real HTTP/2: checked against Envoy as the app's HTTP/2 front.

The agent has no gRPC library; it writes the few HTTP/2 frames of a health check itself
(:mod:`webhook.dataplane.probes`). Envoy, a strict HTTP/2 implementation, terminates them and
hands the call to a small HTTP/1.1 handler that plays ``grpc.health.v1.Health/Check``: it
decodes the requested service name from the request message and answers SERVING for
``shop.Cart``, NOT_SERVING otherwise. (Envoy itself cannot be the gRPC server: its direct
responses to gRPC requests become trailers-only errors.)
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import envoy_binary
from tests.support.ports import free_port
from webhook.dataplane.probes import run_probe

pytestmark = pytest.mark.envoy

_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_HCM = (
    "type.googleapis.com/envoy.extensions.filters.network."
    "http_connection_manager.v3.HttpConnectionManager"
)


class _Health(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self._body()
        message = body[5:]  # gRPC framing: flag + 4-byte length
        service = message[2 : 2 + message[1]].decode() if message[:1] == b"\x0a" else ""
        status = 1 if service == "shop.Cart" and self.path.endswith("/Check") else 2
        answer = b"\x00\x00\x00\x00\x02\x08" + bytes([status])
        self.send_response(200)
        self.send_header("Content-Type", "application/grpc")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def _body(self) -> bytes:
        if "Content-Length" in self.headers:
            return self.rfile.read(int(self.headers["Content-Length"]))
        body = b""  # Envoy forwards an HTTP/2 body without length as chunked HTTP/1.1
        while size := int(self.rfile.readline().split(b";")[0], 16):
            body += self.rfile.read(size)
            self.rfile.readline()
        self.rfile.readline()
        return body

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _config(port: int, upstream: int) -> dict[str, Any]:
    hcm = {
        "@type": _HCM,
        "stat_prefix": "grpc",
        "codec_type": "HTTP2",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "h",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "app"}}],
                }
            ]
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}],
    }
    address = {"socket_address": {"address": "127.0.0.1", "port_value": upstream}}
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "grpc",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "app",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "app",
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
                    },
                }
            ],
        }
    }


def _wait(port: int) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_grpc_probe_reads_the_health_status(tmp_path: Path) -> None:
    binary = envoy_binary()
    app = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=app.serve_forever, daemon=True).start()
    port, closed = free_port(), free_port()
    path = tmp_path / "grpc.json"
    path.write_text(json.dumps(_config(port, app.server_address[1])))
    argv = [binary, "-c", str(path), "--disable-hot-restart", "--concurrency", "1"]
    envoy = subprocess.Popen(
        [*argv, "--log-level", "error", "--base-id-path", str(tmp_path / "base-id")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait(port)
        probe: dict[str, Any] = {
            "grpc": {"port": port, "service": "shop.Cart"},
            "timeoutSeconds": 2,
        }
        assert run_probe(probe, "127.0.0.1") == (200, "gRPC SERVING")
        probe["grpc"]["service"] = "shop.Other"
        assert run_probe(probe, "127.0.0.1") == (503, "gRPC health status 2")
        probe["grpc"]["port"] = closed
        assert run_probe(probe, "127.0.0.1")[0] == 503
    finally:
        envoy.terminate()
        envoy.wait(10)
        app.shutdown()
