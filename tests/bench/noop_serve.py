"""``sidemesh serve`` plus ``POST /noop`` (parse the review, allow it): the benchmark's ceiling.

Run as ``python tests/bench/noop_serve.py serve …`` with the flags of ``sidemesh serve``. The
endpoint is added here, not in the product: it wraps ``create_app`` before the CLI runs, and
worker processes (spawned, so they import this file again as their main module) get it too.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from webhook.admission.review import parse_review
from webhook.errors import ReviewError
from webhook.server import app as server_app
from webhook.server.asgi import BodyTooLarge, json_response, read_body

PATH = "/noop"


class NoopEndpoint:
    """``POST /noop``: the same body reader and envelope check as ``/mutate``, then allow."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.limit = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            body = await read_body(scope, receive, self.limit)
            if body is None:
                return
            doc = parse_review(body)
        except BodyTooLarge:
            await json_response(send, 413, b'{"error":"too-large"}')
            return
        except ReviewError as exc:
            await json_response(send, exc.status, orjson.dumps({"error": str(exc)}))
            return
        answer = {
            "apiVersion": doc["apiVersion"],
            "kind": "AdmissionReview",
            "response": {"uid": doc["request"]["uid"], "allowed": True},
        }
        await json_response(send, 200, orjson.dumps(answer))


_create_app = server_app.create_app


def _create_app_with_noop(**kwargs: Any) -> Any:
    app = _create_app(**kwargs)
    # In front of the whole stack, as /mutate is (create_app has built it already).
    limit = kwargs["config"].webhook.max_body_bytes
    assert app.middleware_stack is not None
    app.middleware_stack = NoopEndpoint(app.middleware_stack, max_body_bytes=limit)
    return app


server_app.create_app = _create_app_with_noop

if __name__ == "__main__":
    from webhook.cli.main import main

    sys.exit(main())
