"""The CA's ``POST /v1/certificates`` router alone, served by uvicorn over real HTTPS.

A small FastAPI app with only the CA router, on a free 127.0.0.1 port, with a serving
certificate from the same CA; the client trusts ``ca.crt`` only.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from webhook.ca.api import router_from_config
from webhook.ca.authority import CA_CERT, CertificateAuthority
from webhook.ca.serving import ensure_dev_pki
from webhook.ca.tokens import TokenVerifier
from webhook.config import MeshConfig

__all__ = ["CAServer", "post", "serve_ca"]


@dataclass
class CAServer:
    url: str
    cert_dir: Path
    registry: CollectorRegistry

    @property
    def ca(self) -> CertificateAuthority:
        return CertificateAuthority.load(self.cert_dir)

    def client(self) -> httpx.Client:
        ctx = ssl.create_default_context(cafile=str(self.cert_dir / CA_CERT))
        return httpx.Client(base_url=self.url, verify=ctx, timeout=10)

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


@contextlib.contextmanager
def serve_ca(
    cert_dir: Path, verifier: TokenVerifier, config: MeshConfig | None = None
) -> Iterator[CAServer]:
    """The CA router in a FastAPI app, served by uvicorn over HTTPS on a free local port."""
    ensure_dev_pki(cert_dir, now=datetime.now(UTC))
    registry = CollectorRegistry()
    router = router_from_config(config or MeshConfig(), cert_dir, verifier, registry=registry)
    assert router is not None
    app = FastAPI()
    app.include_router(router)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            ssl_certfile=str(cert_dir / "tls.crt"),
            ssl_keyfile=str(cert_dir / "tls.key"),
            loop="uvloop",
            http="httptools",
            lifespan="off",
            log_level="warning",
            access_log=False,
        )
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield CAServer(f"https://127.0.0.1:{port}", cert_dir, registry)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def post(srv: CAServer, body: Any, token: str | None, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    headers["Content-Type"] = "application/json"
    headers.update(kwargs.pop("headers", {}))
    with srv.client() as client:
        if isinstance(body, bytes):
            return client.post("/v1/certificates", content=body, headers=headers, **kwargs)
        return client.post("/v1/certificates", json=body, headers=headers, **kwargs)
