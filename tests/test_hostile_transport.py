"""Hostile clients below the application: a real `sidemesh serve` over HTTPS on 127.0.0.1.

Each case is something any pod that can reach the Service could do without credentials:
oversized or endless headers, headers or bodies that never finish, and more connections than
a worker should hold. Each is refused (4xx) or closed, counted in
``sidemesh_http_refusals_total``, and leaves memory bounded; nothing reaches a generic handler.
"""

from __future__ import annotations

import contextlib
import select
import ssl
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.serve_process import (
    SIDEMESH,
    Serve,
    assert_no_unexpected_errors,
    metric_value,
    rss_kib,
    serving,
)
from webhook.config import ClientLimits

LIMITS = ClientLimits()
#: Short times, so that the tests wait little; sizes and counts stay at their defaults.
FLAGS = ("--header-timeout", "1", "--body-timeout", "1", "--idle-timeout", "2")
HEAD = b"POST /mutate HTTP/1.1\r\nHost: sidemesh\r\nContent-Type: application/json\r\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    with serving(tmp_path_factory.mktemp("transport"), *FLAGS) as s:
        yield s


@pytest.fixture(autouse=True)
def no_unexpected_errors(server: Serve) -> Iterator[None]:
    yield
    assert_no_unexpected_errors(server)


def refusals(server: Serve, reason: str) -> float:
    return metric_value(server.metrics(), "sidemesh_http_refusals_total", reason=reason)


def answer(sock: ssl.SSLSocket, wait: float = 10) -> tuple[int | None, bool]:
    """``(status, closed)``: the status line the server sent, if any, and whether it closed.

    A server that closes with unread bytes from the client resets the connection, and the
    reset may overtake its answer: then the status is ``None`` and ``closed`` is True.
    """
    sock.settimeout(wait)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return _status(data), False
    except (ConnectionError, ssl.SSLError):
        pass
    return _status(data), True


def _status(data: bytes) -> int | None:
    if not data.startswith(b"HTTP/1.1 "):
        return None
    return int(data[9:12])


def flood(sock: ssl.SSLSocket, total: int, piece: bytes) -> int:
    """Send up to ``total`` bytes of ``piece`` until the server stops taking them."""
    sent = 0
    with contextlib.suppress(OSError):
        while sent < total:
            sock.sendall(piece)
            sent += len(piece)
    return sent


def test_eight_connections_of_endless_headers_are_cut_and_memory_stays_bounded(
    server: Serve,
) -> None:
    before_rss = rss_kib(server.proc.pid)
    before = refusals(server, "header-too-large")
    socks = [server.tls_socket() for _ in range(8)]
    for sock in socks:
        sock.sendall(HEAD + b"X-Fill: ")
    piece = b"a" * 65536
    sent = [0] * len(socks)
    open_socks = set(range(len(socks)))
    while open_socks:  # 4 MiB each, round robin: 32 MiB in flight at once, as an attacker would
        for i in sorted(open_socks):
            try:
                socks[i].sendall(piece)
                sent[i] += len(piece)
            except OSError:
                open_socks.discard(i)
                continue
            if sent[i] >= 4 << 20:
                open_socks.discard(i)
    for sock in socks:
        status, closed = answer(sock)
        assert closed and status in (431, None)
        sock.close()
    assert refusals(server, "header-too-large") - before == 8
    growth_kib = rss_kib(server.proc.pid) - before_rss
    assert growth_kib < 20 * 1024, f"RSS grew by {growth_kib} KiB"


def test_a_finished_one_mib_header_is_not_served(server: Serve) -> None:
    before = refusals(server, "header-too-large")
    with server.tls_socket() as sock:
        flood(sock, 1, HEAD + b"X-Fill: " + b"a" * (1 << 20) + b"\r\nContent-Length: 2\r\n\r\n{}")
        status, closed = answer(sock)
    assert closed and status in (431, None)
    assert refusals(server, "header-too-large") == before + 1


def test_twenty_thousand_headers_are_refused(server: Serve) -> None:
    before = refusals(server, "too-many-headers")
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(20_000))
    with server.tls_socket() as sock:
        flood(sock, 1, HEAD + many + b"Content-Length: 2\r\n\r\n{}")
        status, closed = answer(sock)
    assert closed and status in (431, None)
    assert refusals(server, "too-many-headers") == before + 1


def test_a_huge_request_line_is_refused_414(server: Serve) -> None:
    with server.tls_socket() as sock:
        target = b"/" + b"a" * (LIMITS.max_request_line_bytes + 1)
        sock.sendall(b"GET " + target)  # no more bytes: the answer is readable
        status, closed = answer(sock)
    assert (status, closed) == (414, True)
    assert refusals(server, "request-line-too-long") >= 1


def test_headers_that_never_finish_are_answered_408_and_closed(server: Serve) -> None:
    with server.tls_socket() as sock:
        sock.sendall(HEAD)  # and nothing more
        status, closed = answer(sock)
    assert (status, closed) == (408, True)
    assert refusals(server, "header-timeout") >= 1


def test_slow_headers_are_closed_before_they_finish(server: Serve) -> None:
    """One header line every 0.3 s: the header timeout counts from the first byte."""
    with server.tls_socket() as sock:
        sock.sendall(HEAD)
        for i in range(40):  # 12 s of headers if nobody stopped them
            readable, _, _ = select.select([sock], [], [], 0.3)
            if readable:
                break
            with contextlib.suppress(OSError):
                sock.sendall(b"X-Slow-%d: yes\r\n" % i)
        else:
            pytest.fail("the server let 40 slow header lines through")
        status, closed = answer(sock)
    assert (status, closed) == (408, True)


@pytest.mark.parametrize(
    "request_bytes",
    [
        HEAD + b"Content-Length: 100\r\n\r\n" + b'{"kind": "Adm',
        HEAD + b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\n',
    ],
    ids=["short-content-length", "chunked-without-last-chunk"],
)
def test_bodies_that_never_finish_are_closed(server: Serve, request_bytes: bytes) -> None:
    before = refusals(server, "body-timeout")
    with server.tls_socket() as sock:
        sock.sendall(request_bytes)
        status, closed = answer(sock)
    assert (status, closed) == (408, True)
    assert refusals(server, "body-timeout") == before + 1


def test_an_idle_keep_alive_connection_is_closed_after_the_idle_limit(server: Serve) -> None:
    with server.tls_socket() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: sidemesh\r\n\r\n")
        sock.settimeout(10)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        status, closed = answer(sock)  # idle: the server closes after --idle-timeout
    assert (status, closed) == (None, True)


def test_a_connection_flood_beyond_the_cap_does_not_lock_out_a_normal_client(
    tmp_path: Path,
) -> None:
    cap = 16
    s = Serve(tmp_path, "--max-connections", str(cap), "--header-timeout", "60")
    try:
        s.wait_ready()
        flooders = []
        for _ in range(3 * cap):
            sock = s.tls_socket()
            sock.sendall(HEAD)  # a request that never finishes, held open
            flooders.append(sock)
        with s.client() as client:
            body = (Path(__file__).parents[1] / "webhook/samples/review.json").read_bytes()
            r = client.post("/mutate", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 200 and r.json()["response"]["allowed"] is True
        text = s.metrics()
        assert metric_value(text, "sidemesh_http_refusals_total", reason="connection-limit") >= (
            2 * cap
        )
        assert metric_value(text, "sidemesh_http_connections") <= cap
        for sock in flooders:
            with contextlib.suppress(OSError):
                sock.close()
    finally:
        s.kill()


def test_garbage_instead_of_http_is_refused_400(server: Serve) -> None:
    with server.tls_socket() as sock:
        sock.sendall(b"\x00\x01 NOT HTTP \r\n\r\n")
        status, closed = answer(sock)
    assert (status, closed) == (400, True)
    assert refusals(server, "bad-request") >= 1


def test_the_server_still_answers_after_all_of_it(server: Serve) -> None:
    with server.client() as client:
        assert client.get("/healthz").status_code == 200
    assert server.proc.poll() is None


def test_the_certificate_directory_serve_creates_is_private(server: Serve) -> None:
    """It holds ca.key: created 0700 whatever the umask (it was 0755 under umask 022)."""
    assert stat.S_IMODE(server.cert_dir.stat().st_mode) == 0o700


def test_pipelined_requests_each_get_their_own_header_budget(server: Serve) -> None:
    """Two requests in one write, each with most of the header limit: both are answered."""
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(LIMITS.max_headers - 10))
    one = b"GET /healthz HTTP/1.1\r\nHost: sidemesh\r\n" + headers + b"\r\n"
    with server.tls_socket() as sock:
        sock.sendall(one + one)
        sock.settimeout(10)
        data = b""
        while data.count(b"HTTP/1.1 200") < 2:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk


def test_a_bad_limit_flag_fails_at_start_naming_the_key(tmp_path: Path) -> None:
    p = subprocess.run(
        [*SIDEMESH, "serve", "--header-timeout", "0", "--cert-dir", str(tmp_path / "certs")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode != 0
    assert "limits.header_timeout_seconds" in p.stderr and "must be positive" in p.stderr
    assert not (tmp_path / "certs").exists()  # nothing written before the flags are checked
