"""``sidemesh proxy wait``: return as soon as the local proxy is ready.

It is the proxy container's postStart hook: the kubelet starts the next container (the app)
only once it has returned, so every millisecond here is a millisecond of pod start. Hence its
own module with nothing but the standard library's HTTP client: importing the agent (key
generation, the bootstrap, ``cryptography``) would cost more than the wait itself.
"""

from __future__ import annotations

import http.client
import time
import urllib.parse

__all__ = ["wait_ready"]


def wait_ready(url: str, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``url`` (plain HTTP) until it answers 200; ``False`` once ``timeout`` has passed.

    Every ``interval`` seconds: the poll period is what the app waits after the proxy became
    ready. A refused connection (Envoy not listening yet) costs nothing; each request gets at
    most one second. No proxy environment variable applies: the URL is the pod's own."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"readiness URL {url!r}: expected http://HOST:PORT/PATH")
    path = parts.path or "/"
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=min(1.0, left))
        try:
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return True
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
