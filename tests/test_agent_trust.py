"""The agent trusts only the mesh: every fault of a misbehaving CA is refused or retried.

:class:`tests.support.evil_ca.EvilCA` is a real HTTPS server (a serving certificate from the
mesh root) that answers certificate requests the way a broken or compromised control plane
might. For each fault, one attempt of the agent (:class:`CertificateSource`) must fail with a
reason and leave Envoy's certificate directory exactly as it was; the retry loop must wait
its backoff (attempts counted over a window); the answer's ``trustBundle`` is never installed.
The agent as a process (SIGTERM, expiry with the CA down) is in ``test_agent_trust_netns.py``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.support.evil_ca import EvilCA
from tests.support.ports import free_port
from webhook.dataplane import agent
from webhook.dataplane.cacall import parse_ca_address
from webhook.dataplane.identity import CARequestError
from webhook.dataplane.renew import AgentStatus, Backoff, CertificateSource
from webhook.errors import ConfigError

SPIFFE = "spiffe://cluster.local/ns/shop/sa/cart"


@pytest.fixture
def ca(tmp_path: Path) -> Iterator[EvilCA]:
    server = EvilCA(tmp_path)
    yield server
    server.close()


def _source(ca: EvilCA, tmp_path: Path, address: str | None = None) -> CertificateSource:
    token = tmp_path / "token"
    token.write_text("the-projected-token")
    return CertificateSource(
        ca_address=address or ca.address,
        token_file=token,
        bundle_file=tmp_path / "ca.crt",
        cert_dir=tmp_path / "certs",
        spiffe_id=SPIFFE,
        ttl_seconds=600,
        request_timeout=2.0,
    )


def _now() -> datetime:
    return datetime.now(UTC)


def _snapshot(cert_dir: Path) -> dict[str, bytes]:
    if not cert_dir.exists():
        return {}
    return {p.name: p.read_bytes() for p in cert_dir.iterdir() if not p.is_dir()}


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("other-root", "does not chain to the pod's trust bundle"),
        ("expired", "expired at"),
        ("not-yet-valid", "not valid before"),
        ("wrong-id", "but this pod is"),
        ("ca-cert", "CA certificate"),
        ("other-key", "different key"),
        ("redirect", "redirect"),
        ("truncated", "cut short"),
        ("invalid-json", "not JSON"),
        ("huge-json", "too large"),
        ("nested-json", "nested too deeply"),
        ("not-object", "lacks a certificateChain"),
        ("http-500", "HTTP 500 internal: try later"),
        ("trickle", "no answer in 2s"),
        ("reset", "CA unreachable"),
    ],
)
def test_each_fault_is_refused_and_nothing_is_installed(
    ca: EvilCA, tmp_path: Path, mode: str, reason: str
) -> None:
    source = _source(ca, tmp_path)
    status = AgentStatus()
    source.attempt(_now, threading.Event(), status)  # a good certificate first
    before = _snapshot(source.cert_dir / "..data")
    ca.mode = mode
    with pytest.raises(CARequestError, match=reason):
        source.attempt(_now, threading.Event(), status)
    assert _snapshot(source.cert_dir / "..data") == before, "Envoy's files were replaced"
    assert (status.requests_ok, status.requests_failed) == (1, 1)
    assert ca.leaks == [], "the token was sent to the redirect target"


def test_refused_connection_is_an_error_not_a_crash(ca: EvilCA, tmp_path: Path) -> None:
    closed = f"https://127.0.0.1:{free_port()}"
    with pytest.raises(CARequestError, match="CA unreachable"):
        _source(ca, tmp_path, closed).attempt(_now, threading.Event(), AgentStatus())
    assert not (tmp_path / "certs").exists()


def test_a_swapped_trust_bundle_is_ignored_and_only_the_pods_is_installed(
    ca: EvilCA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca.mode = "swapped-bundle"
    source = _source(ca, tmp_path)
    source.attempt(_now, threading.Event(), AgentStatus())  # the certificate itself is fine
    installed = (source.cert_dir / "ca.crt").read_text()
    assert installed == ca.root.root_pem
    assert ca.other.root_pem not in installed
    assert "differs from this pod's bundle" in caplog.text


def test_token_is_never_sent_over_plain_http_or_to_an_untrusted_server(
    ca: EvilCA, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="must be https"):
        parse_ca_address(f"http://127.0.0.1:{ca.plain_port}")
    with pytest.raises(ConfigError, match="must be https"):
        agent.settings_from(
            {
                "ca_address": f"http://127.0.0.1:{ca.plain_port}",
                "token_file": "t",
                "bundle_file": "b",
                "cert_dir": "c",
                "work_dir": "w",
                "envoy_binary": "envoy",
                "log_level": "info",
                "concurrency": 1,
            },
            {"POD_NAME": "p", "POD_NAMESPACE": "shop"},
        )
    # A server whose certificate does not chain to the pod's bundle never sees the token.
    (tmp_path / "ca.crt").write_text(ca.other.root_pem)
    with pytest.raises(CARequestError, match="not trusted"):
        _source(ca, tmp_path).attempt(_now, threading.Event(), AgentStatus())
    assert ca.requests == []


def test_retries_back_off_instead_of_looping(ca: EvilCA, tmp_path: Path) -> None:
    """A CA that answers an expired certificate every time (once ~9 renewals a second)."""
    ca.mode = "expired"
    stop = threading.Event()
    backoff = Backoff(base=0.2, cap=1.0)
    result: list[object] = []
    thread = threading.Thread(
        target=lambda: result.append(
            agent._obtain(_source(ca, tmp_path), _now, stop, AgentStatus(), backoff)
        )
    )
    thread.start()
    time.sleep(4.0)
    stop.set()
    thread.join(timeout=5)
    assert result == [None]  # stopped, never installed anything
    # Waits of at least 0.1, 0.2, 0.4, then 0.5 each: at most 10 attempts in 4 s.
    assert 3 <= len(ca.requests) <= 10, ca.requests
    assert not (tmp_path / "certs").exists()


def test_backoff_is_capped_jittered_and_reset() -> None:
    low = Backoff(base=0.5, cap=4.0, rand=lambda: 0.0)
    assert [low.delay() for _ in range(6)] == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    high = Backoff(base=0.5, cap=4.0, rand=lambda: 0.999)
    assert max(high.delay() for _ in range(50)) < 4.0
    high.reset()
    assert high.delay() < 0.5


def test_a_stopped_call_returns_at_once_even_mid_answer(ca: EvilCA, tmp_path: Path) -> None:
    ca.mode = "trickle"
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    source = CertificateSource(**{**_source(ca, tmp_path).__dict__, "request_timeout": 60.0})
    t0 = time.monotonic()
    with pytest.raises(CARequestError, match="stopped"):
        source.attempt(_now, stop, AgentStatus())
    assert time.monotonic() - t0 < 5  # not the 60 s deadline
