"""Small ASGI helpers of the server, and its one request-body reader.

:func:`read_body` is the only place a request body is read and held to a size limit (the
admission endpoint and the CA use it, each with its own limit from the mesh config): a
declared ``Content-Length`` above the limit is refused before a byte of the body is read, and
a chunked body as soon as it grows past the limit.
"""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

__all__ = ["BodyTooLarge", "header", "json_response", "read_body"]

_JSON_HEADERS = [(b"content-type", b"application/json")]


class BodyTooLarge(Exception):
    """The body is (or says it is) larger than the limit; callers answer 413 with their reason."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"body of {size} bytes, limit {limit}")
        self.size = size
        self.limit = limit


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case), or ``None``."""
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The whole request body, at most ``limit`` bytes; ``None`` if the client went away.

    Raises :class:`BodyTooLarge` as soon as the declared length or the bytes read exceed it.
    """
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(int(declared), limit)
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect: nobody is left to answer
            return None
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(size, limit)
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def json_response(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {"type": "http.response.start", "status": status, "headers": headers or _JSON_HEADERS}
    )
    await send({"type": "http.response.body", "body": body})
