"""``POST /mutate`` as a small ASGI middleware in front of the FastAPI app.

:class:`MutateEndpoint` answers ``/mutate`` straight from the ASGI messages: FastAPI's router,
request object and dependency solving cost more per request than the review itself. Every
other path goes on to the app. Other methods on ``/mutate`` get 405. The body is read by the
server's one reader (:func:`webhook.server.asgi.read_body`) with ``webhook.max_body_bytes``.

Every answer is JSON. A problem with the request is a typed refusal (:class:`ReviewError`,
its reason in the metrics); an exception that is not one of those is a bug: it is logged with
its traceback, counted in ``sidemesh_unexpected_errors_total`` and answered 500 with a fixed
message (never the exception's text).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from webhook.admission.review import (
    Injector,
    InvalidReview,
    check_content_type,
    review,
    too_large,
)
from webhook.errors import ReviewError
from webhook.server.asgi import BodyTooLarge, header, json_response, read_body
from webhook.server.logs import LOGGER, log_invalid, log_review
from webhook.server.metrics import Metrics

__all__ = ["PATH", "MutateEndpoint"]

PATH = "/mutate"
_JSON_HEADERS = [(b"content-type", b"application/json")]


class MutateEndpoint:
    """ASGI middleware: ``/mutate`` answered here, everything else passed on to ``app``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        injector: Injector,
        max_body_bytes: int,
        metrics: Metrics,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.app = app
        self.injector = injector
        self.limit = max_body_bytes
        self.metrics = metrics
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            body = orjson.dumps({"error": "method", "message": "use POST for /mutate"})
            await json_response(send, 405, body, [*_JSON_HEADERS, (b"allow", b"POST")])
            return
        started = self.clock()
        try:
            content_type = header(scope, b"content-type")
            check_content_type(None if content_type is None else content_type.decode("latin-1"))
            raw = await read_body(scope, receive, self.limit)
            if raw is None:
                return
            status, payload = self.answer(raw, started)
        except BodyTooLarge as exc:
            status, payload = self.refuse(too_large(exc.size, exc.limit), started)
        except ReviewError as exc:
            status, payload = self.refuse(exc, started)
        await json_response(send, status, payload)

    def answer(self, body: bytes, started: float) -> tuple[int, bytes]:
        """The review's answer: ``(HTTP status, JSON body)``."""
        try:
            outcome = review(body, injector=self.injector)
            payload = orjson.dumps(outcome.response)
        except ReviewError as exc:
            return self.refuse(exc, started)
        except Exception:  # a bug: every expected problem above is a ReviewError or a denial
            LOGGER.exception("unexpected error answering a review")
            self.metrics.unexpected.labels("mutate").inc()
            message = {"error": "internal", "message": "sidemesh could not answer; see its log"}
            return 500, orjson.dumps(message)
        if outcome.error is not None:  # the core failed on this pod: denied, and a bug
            self.metrics.unexpected.labels("inject").inc()
        seconds = self.clock() - started
        self.metrics.observe(outcome.result, outcome.reason, seconds)
        log_review(outcome, seconds)
        return 200, payload

    def refuse(self, exc: ReviewError, started: float) -> tuple[int, bytes]:
        reason = exc.reason if isinstance(exc, InvalidReview) else "invalid"
        uid = exc.uid if isinstance(exc, InvalidReview) else ""
        seconds = self.clock() - started
        self.metrics.observe("invalid", reason, seconds)
        log_invalid(exc.status, reason, str(exc), uid, seconds)
        body: dict[str, Any] = {"error": reason, "message": str(exc)}
        if uid:
            body["uid"] = uid
        return exc.status, orjson.dumps(body)
