"""The real app and server over real HTTPS, on a background thread of the test process."""

from __future__ import annotations

import threading
import time

from fastapi import FastAPI

from webhook.config import ClientLimits
from webhook.server.app import GRACEFUL_SHUTDOWN_SECONDS, make_server, reuse_port_socket
from webhook.server.tlsreload import ReloadingTLS

__all__ = ["ServerThread"]


class ServerThread:
    """``with ServerThread(app, tls) as srv:`` then ``srv.url``; the kernel picks the port."""

    def __init__(
        self,
        app: FastAPI,
        tls: ReloadingTLS,
        *,
        host: str = "127.0.0.1",
        limits: ClientLimits | None = None,
    ) -> None:
        self.sock = reuse_port_socket(host, 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"https://{host}:{self.port}"
        self.server = make_server(app, tls, host=host, port=self.port, limits=limits)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=GRACEFUL_SHUTDOWN_SECONDS + 5)
        self.sock.close()
