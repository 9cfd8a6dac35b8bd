"""The agent's one call to the CA: ``POST <ca>/v1/certificates`` with the pod's token.

The CA is on the other side of the network and may be down, slow, misconfigured or hostile;
every way it can fail ends here as a :class:`CARequestError` (the agent retries it with
backoff) and never as an exception that takes the agent, and so Envoy, down:

* the token goes only to the configured address, only over TLS verified against the pod's
  trust bundle (hostname included); ``https`` is required, redirects are never followed (an
  answer 3xx is an error), proxy variables are ignored;
* the whole call, connect to last byte, has one deadline: an answer trickled a byte at a time
  is cut off like a silent one; the call runs on its own thread so that the caller can stop
  waiting at once (SIGTERM) — a call abandoned that way ends at its deadline;
* the answer is bounded (size, then JSON nesting: Python's parser raises ``RecursionError`` on
  deeply nested arrays) and must be an object with a string ``certificateChain``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Final

from webhook.dataplane.identity import CARequestError

__all__ = ["CAAnswer", "parse_ca_address", "request_certificate"]

#: A certificate chain and a bundle are a few KiB; anything much larger is not an answer.
MAX_ANSWER_BYTES: Final = 256 * 1024


@dataclass(frozen=True)
class CAAnswer:
    chain_pem: str
    #: What the CA says the roots are: compared with the pod's bundle and logged, never used.
    trust_bundle_pem: str | None


def parse_ca_address(address: str) -> tuple[str, int, str]:
    """``https://host[:port][/prefix]`` → (host, port, request path); ``ValueError`` otherwise."""
    parts = urllib.parse.urlsplit(address)
    if parts.scheme != "https":
        raise ValueError(f"CA address {address!r} must be https:// (the token is a credential)")
    if not parts.hostname or parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError(f"CA address {address!r}: expected https://HOST[:PORT][/PATH]")
    try:
        port = parts.port or 443
    except ValueError:
        raise ValueError(f"CA address {address!r} has a bad port") from None
    return parts.hostname, port, parts.path.rstrip("/") + "/v1/certificates"


def request_certificate(
    ca_address: str,
    *,
    csr_pem: str,
    token: str,
    bundle_pem: str,
    ttl_seconds: int | None,
    timeout: float = 10.0,
    cancel: threading.Event | None = None,
) -> CAAnswer:
    """One call, at most ``timeout`` seconds; returns early with an error once ``cancel`` is set."""
    host, port, path = parse_ca_address(ca_address)
    body: dict[str, object] = {"csr": csr_pem}
    if ttl_seconds:
        body["ttlSeconds"] = ttl_seconds
    try:
        ctx = ssl.create_default_context(cadata=bundle_pem)
    except (ssl.SSLError, ValueError) as exc:
        raise CARequestError(f"cannot use the trust bundle: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}

    def call() -> tuple[int, str, bytes]:
        conn.request("POST", path, body=json.dumps(body).encode(), headers=headers)
        resp = conn.getresponse()
        length = resp.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > MAX_ANSWER_BYTES:
            raise CARequestError(f"CA answer of {length} bytes is too large")
        data = resp.read(MAX_ANSWER_BYTES + 1)
        if length is not None and length.isdigit() and len(data) < int(length):
            # read(n) hands back what came before the connection closed; that is not an answer
            raise CARequestError(f"answer cut short ({len(data)} of {length} bytes)")
        return resp.status, resp.getheader("Location") or "", data

    status, location, data = _bounded(call, conn, timeout, cancel, where=ca_address)
    if 300 <= status < 400:
        target = location[:200]
        raise CARequestError(f"CA answered a redirect (HTTP {status} to {target!r}): refused")
    if len(data) > MAX_ANSWER_BYTES:
        raise CARequestError(f"CA answer is too large (over {MAX_ANSWER_BYTES} bytes)")
    if status != 200:
        raise CARequestError(f"CA refused: HTTP {status} {_error_text(data)}")
    return _parse_answer(data)


def _bounded(
    call: Any,
    conn: http.client.HTTPSConnection,
    timeout: float,
    cancel: threading.Event | None,
    *,
    where: str,
) -> tuple[int, str, bytes]:
    """Run ``call`` on a thread; give up at the deadline or on ``cancel`` (closing the socket
    frees the thread: a read blocked on it returns)."""
    result: list[tuple[int, str, bytes]] = []
    error: list[BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            result.append(call())
        except BaseException as exc:  # handed to the caller below
            error.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name="ca-call", daemon=True).start()
    deadline = time.monotonic() + timeout
    while not done.wait(0.05):
        stopped = cancel is not None and cancel.is_set()
        if stopped or time.monotonic() >= deadline:
            _abort(conn)
            why = "stopped" if stopped else f"CA at {where}: no answer in {timeout:g}s"
            raise CARequestError(why)
    if error:
        exc = error[0]
        if isinstance(exc, CARequestError):
            raise exc
        if isinstance(exc, http.client.IncompleteRead):
            raise CARequestError(f"CA at {where}: answer cut short") from None
        if isinstance(exc, ssl.SSLCertVerificationError):
            raise CARequestError(f"CA at {where} is not trusted: {exc.verify_message}") from None
        if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError):
            raise CARequestError(f"CA unreachable at {where}: {exc}"[:300]) from None
        if isinstance(exc, (OSError, http.client.HTTPException, ValueError)):
            raise CARequestError(f"CA at {where}: {type(exc).__name__}: {exc}"[:300]) from None
        raise CARequestError(f"CA at {where}: unexpected {type(exc).__name__}") from None
    return result[0]


def _abort(conn: http.client.HTTPSConnection) -> None:
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        conn.close()


def _parse_answer(data: bytes) -> CAAnswer:
    try:
        answer = json.loads(data)
    except (ValueError, RecursionError):
        raise CARequestError("CA answer is not JSON (or nested too deeply)") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("certificateChain"), str):
        raise CARequestError("CA answer lacks a certificateChain string")
    bundle = answer.get("trustBundle")
    return CAAnswer(answer["certificateChain"], bundle if isinstance(bundle, str) else None)


def _error_text(data: bytes) -> str:
    try:
        parsed = json.loads(data[:4096])
    except (ValueError, RecursionError):
        return ""
    if not isinstance(parsed, dict):
        return ""
    return f"{parsed.get('error', '')}: {parsed.get('message', '')}".strip(": ")[:300]
