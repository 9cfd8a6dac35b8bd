"""The control plane's debug endpoint (plain HTTP, meant for 127.0.0.1 or a port-forward).

``GET /debug/proxies``          every connected proxy: identity, what it ACKed, NACKs
``GET /debug/config?pod=NS/NAME``  that proxy's resources as sent (Envoy JSON), by type
``GET /debug/policies``         access and rate-limit policies: what each selects, references
                                that resolve to nothing, and the ones not enforced (why)
``GET /debug/rules``            traffic rules: each Service port's routes (by rule) and problems
``GET /metrics``                Prometheus
``GET /healthz``                200 once the first model is built

The HTTP server runs in a thread; each answer is computed on the event loop (the push engine's
state is only touched there).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from webhook.discovery import compiler as cc, metrics
from webhook.discovery.conn import ProxyConn
from webhook.discovery.core import PUSH_ORDER, Discovery
from webhook.discovery.resources import decode
from webhook.policy.envoy import EXTENSION_CONFIG
from webhook.routing.xds import problems_text

__all__ = ["DebugServer", "config_of", "proxy_status", "rules_of"]

_SHORT = {
    cc.CLUSTER: "clusters",
    cc.ENDPOINTS: "endpoints",
    cc.LISTENER: "listeners",
    cc.ROUTE: "routes",
    EXTENSION_CONFIG: "extensions",
}


def proxy_status(d: Discovery) -> list[dict[str, Any]]:
    out = []
    for conn in sorted(d.proxies.values(), key=lambda c: (c.namespace, c.pod_name, c.conn_id)):
        types: dict[str, Any] = {}
        for type_url in PUSH_ORDER:
            ts = conn.types.get(type_url)
            if ts is None:
                continue
            nack = ts.last_nack
            types[_SHORT[type_url]] = {
                "resources": len(ts.sent),
                "last_sent_nonce": str(conn.nonce),
                "last_acked_nonce": ts.last_acked_nonce,
                "unacked": sorted(ts.pending),
                "nacks": ts.nacks,
                "last_nack": None
                if nack is None
                else {"nonce": nack.nonce, "error": nack.message, "resources": list(nack.names)},
            }
        out.append(
            {
                "pod": f"{conn.namespace}/{conn.pod_name}",
                "identity": conn.spiffe_id,
                "peer": conn.peer,
                "connected_at": conn.connected_at,
                "generation": d.generation,
                "synced": all(not t.get("unacked") for t in types.values()),
                "types": types,
            }
        )
    return out


def _conn_for(d: Discovery, pod: str) -> ProxyConn | None:
    ns, _, name = pod.partition("/")
    found = [c for c in d.proxies.values() if c.namespace == ns and c.pod_name == name]
    return max(found, key=lambda c: c.conn_id) if found else None


def config_of(d: Discovery, pod: str) -> dict[str, Any] | None:
    """What the proxy of ``pod`` was sent, decoded back to Envoy JSON."""
    conn = _conn_for(d, pod)
    if conn is None:
        return None
    out: dict[str, Any] = {}
    for type_url in PUSH_ORDER:
        ts = conn.types.get(type_url)
        if ts is None:
            continue
        table = d.tables.get(type_url)
        local = conn.local.get(type_url, {})
        items = []
        for name in sorted(ts.sent):
            enc = local.get(name) or (table.items.get(name) if table else None)
            if enc is None:
                continue
            items.append(decode(type_url, enc))
        out[_SHORT[type_url]] = items
    return out


def rules_of(d: Discovery) -> dict[str, Any]:
    """The traffic rules as the control plane resolved them: routes per Service port (by the
    rule each came from), TrafficPolicies per Service, and every problem by object."""
    table = d.routing
    return {
        "routes": {name: [e.source for e in entries] for name, entries in table.routes.items()},
        "policies": {f"{ns}/{svc}": p.ref for (ns, svc), p in table.policies.items()},
        "subsets": sorted(table.subsets),
        "problems": problems_text(table),
    }


class DebugServer:
    def __init__(self, d: Discovery, loop: asyncio.AbstractEventLoop, host: str, port: int):
        self.d, self.loop = d, loop
        handler = _handler_for(self)
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def on_loop(self, fn: Any, *args: Any) -> Any:
        async def call() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout=10)


def _handler_for(server: DebugServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            return  # quiet: operators poll this

        def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            if url.path == "/healthz":
                self._send(200, b"ok\n", "text/plain")
            elif url.path == "/metrics":
                self._send(200, generate_latest(metrics.REGISTRY), CONTENT_TYPE_LATEST)
            elif url.path == "/debug/proxies":
                data = server.on_loop(proxy_status, server.d)
                self._send(200, _json({"time": time.time(), "proxies": data}))
            elif url.path == "/debug/rules":
                self._send(200, _json(server.on_loop(rules_of, server.d)))
            elif url.path == "/debug/policies":
                report = server.on_loop(lambda d: d.authz.report(d.model), server.d)
                self._send(200, _json(report))
            elif url.path == "/debug/config":
                pod = (parse_qs(url.query).get("pod") or [""])[0]
                data = server.on_loop(config_of, server.d, pod)
                if data is None:
                    msg = {"error": f"no proxy of pod {pod!r} is connected (want NS/NAME)"}
                    self._send(404, _json(msg))
                else:
                    self._send(200, _json(data))
            else:
                self._send(404, _json({"error": f"no such page {url.path}"}))

    return Handler


def _json(data: Any) -> bytes:
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()
