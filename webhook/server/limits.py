"""Client limits on the HTTP connection: sizes, times and the connection cap of one worker.

uvicorn's httptools protocol parses requests but bounds nothing a client controls before the
app runs: headers of any size and count, headers or a body that never finish, and as many
connections as the kernel accepts (``limit_concurrency`` answers 503 only once a request's
headers are complete, so it cannot stop a slow-header flood, and it refuses the API server
as readily as an attacker). uvicorn's h11 protocol bounds an unfinished request's size
(``h11_max_incomplete_event_size``) but times out neither headers nor bodies, so it would need
the same guard. :class:`GuardedProtocol` is the httptools protocol with the limits of
:class:`~webhook.config.ClientLimits` added where the bytes arrive:

=====================================  =================  ===============================
what                                   answer             ``sidemesh_http_refusals_total``
=====================================  =================  ===============================
request target longer than the limit   414, closed        ``request-line-too-long``
request line + headers above the limit 431, closed        ``header-too-large``
more header fields than the limit      431, closed        ``too-many-headers``
headers not complete in time           408, closed        ``header-timeout``
body not complete in time              408, closed        ``body-timeout``
a connection beyond the cap            503, closed        ``connection-limit``
unparsable HTTP                        400, closed        ``bad-request``
=====================================  =================  ===============================

The connection cap closes the oldest connection that has not yet sent a whole request, then
the oldest idle keep-alive one, so a flood of slow connections cannot keep the API server
out; only when every connection is busy with a request is the new one refused. Idle
keep-alive is uvicorn's own ``timeout_keep_alive``. Bodies are held to their size by the
endpoint that reads them (:func:`webhook.admission.endpoint.read_body`).

The TLS handshake happens before this protocol sees the connection; asyncio bounds it (60 s).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from webhook.config import ClientLimits
from webhook.server.metrics import Metrics

__all__ = ["GuardedProtocol", "guarded_protocol"]

#: How long a refused connection may take to close cleanly before it is aborted.
_CLOSE_GRACE_SECONDS = 1.0

_PHRASES = {
    400: b"Bad Request",
    408: b"Request Timeout",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


class _Refused(Exception):
    """Raised from a parser callback: httptools stops parsing and re-raises it wrapped."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def guarded_protocol(limits: ClientLimits, metrics: Metrics) -> type[GuardedProtocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` with these limits and counters.

    Every connection of the class shares one table of open connections: one per worker.
    """
    return type(
        "GuardedHttpProtocol",
        (GuardedProtocol,),
        {"limits": limits, "metrics": metrics, "open_connections": {}},
    )


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with :class:`ClientLimits` (see the module docstring)."""

    limits: ClientLimits
    metrics: Metrics
    open_connections: dict[GuardedProtocol, None]
    """Open connections of this worker, oldest first (a dict keeps insertion order)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = "headers"  # headers -> body -> app -> idle -> headers ...
        self._head_bytes = 0
        self._header_fields = 0
        self._timer: asyncio.TimerHandle | None = None
        self._counted = False

    # --- connection life cycle ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.open_connections[self] = None
        self._counted = True
        self.metrics.connections.inc()
        self._arm(self.limits.header_timeout_seconds, self._header_timeout)
        if len(self.open_connections) > self.limits.max_connections:
            victim = self._victim()
            (victim if victim is not None else self)._refuse(503, "connection-limit")

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        super().connection_lost(exc)

    def _forget(self) -> None:
        self._disarm()
        if self._counted:
            self._counted = False
            self.open_connections.pop(self, None)
            self.metrics.connections.dec()

    def _victim(self) -> GuardedProtocol | None:
        """The connection to close for a new one: the oldest unfinished request, else idle."""
        idle = None
        for conn in self.open_connections:
            if conn is self:
                continue
            if conn._phase == "headers":
                return conn
            if conn._phase == "idle" and idle is None:
                idle = conn
        return idle

    # --- bytes in ----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._phase == "idle":  # the next request starts: its headers are on the clock
            self._phase = "headers"
            self._head_bytes = self._header_fields = 0
            self._arm(self.limits.header_timeout_seconds, self._header_timeout)
        if self._phase == "headers":
            self._head_bytes += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            refused = exc.__context__ or exc.__cause__
            if not isinstance(refused, _Refused):
                raise
            self._refuse(refused.status, refused.reason)
            return
        except httptools.HttpParserUpgrade:
            return  # as uvicorn: the request was served as plain HTTP, no upgrade follows
        except httptools.HttpParserError:
            self._refuse(400, "bad-request")
            return
        # Bytes the parser holds without a callback yet (a header value that never ends).
        if self._phase == "headers" and self._head_bytes > self.limits.max_header_bytes:
            self._refuse(431, "header-too-large")

    # --- parser callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_fields = 0
        if self._phase == "app":  # a pipelined request behind one still being answered
            self._phase = "headers"
            self._arm(self.limits.header_timeout_seconds, self._header_timeout)

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_request_line_bytes:
            raise _Refused(414, "request-line-too-long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_fields += 1
        if self._header_fields > self.limits.max_headers:
            raise _Refused(431, "too-many-headers")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._phase = "body"
        self._arm(self.limits.body_timeout_seconds, self._body_timeout)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._phase = "app"
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._phase == "app" and not self.pipeline:
            self._phase = "idle"  # uvicorn's keep-alive timer runs from here

    # --- timers and refusals -----------------------------------------------------------------

    def _arm(self, seconds: float, handler: Any) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, handler)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _header_timeout(self) -> None:
        self._timer = None
        if self._phase == "headers":
            self._refuse(408, "header-timeout")

    def _body_timeout(self) -> None:
        self._timer = None
        if self._phase == "body":
            self._refuse(408, "body-timeout")

    def _refuse(self, status: int, reason: str) -> None:
        """Count, answer ``status`` unless a response has started, and close."""
        self.metrics.http_refusals.labels(reason).inc()
        self._forget()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        started = self.cycle is not None and self.cycle.response_started
        if not started:
            body = orjson.dumps({"error": reason, "message": f"refused: {reason}"})
            transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n%s" % (status, _PHRASES[status], len(body), body)
            )
        if self.cycle is not None:
            self.cycle.keep_alive = False
        transport.close()
        # A TLS close waits for the client's close_notify and reads (and drops) whatever it
        # still sends meanwhile; a hostile client would keep that going. Cut it short.
        self.loop.call_later(_CLOSE_GRACE_SECONDS, _abort, transport)


def _abort(transport: asyncio.Transport) -> None:
    with contextlib.suppress(Exception):  # already gone: nothing to do
        transport.abort()
