"""Every protocol the outbound side tells apart, across the mesh with real Envoys, both ways.

The lab of :mod:`meshlab` with :mod:`protoapp` as the app of both meshed pods: the client pod is
PERMISSIVE, the server pod STRICT, so calling client → server and server → client covers both
modes. For each direction: HTTP/2 with prior knowledge (``curl --http2-prior-knowledge``),
gRPC unary and server-streaming (grpcio), HTTP/1.1, HTTP/1.0, an HTTP/1.1 ``Upgrade: h2c``
(served as HTTP/1.1), and a TCP protocol that is not HTTP. Every HTTP answer must come from the
server's Envoy (peer 127.0.0.6) and carry the caller's SPIFFE ID in
``x-forwarded-client-cert``. A pod without a sidecar reaches the PERMISSIVE pod with h2c and
gRPC (no identity, a forged one stripped) and is refused by the STRICT one.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from tests.conftest import envoy_binary, require_root, require_tools
from tests.support.meshlab import APP_UID, app, checked_lab, start_mesh, stats, trouble
from tests.support.netns import Netns, NetnsLab
from tests.support.programs import PROGRAMS

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.envoy]

PROTOAPP = str(PROGRAMS / "protoapp.py")
#: grpcio and h2 live in the venv; uid 1000 can run its interpreter (the lab checks 1337's).
VENV_PYTHON = sys.executable
GRPC_PORT, TCP_PORT = "50051", "7000"


def test_protocols_across_the_mesh() -> None:
    require_root()
    require_tools("ip", "iptables", "iptables-restore", "setpriv", "unshare", "curl")
    envoy_binary()
    with checked_lab("smproto") as lab:
        _checks(lab)


def _spiffe(sa: str) -> str:
    return f"spiffe://cluster.local/ns/demo/sa/{sa}"


def curl(ns: Netns, *args: str) -> dict[str, Any]:
    """curl as the app uid; the answer's JSON plus the HTTP version curl negotiated."""
    done = ns.run(
        ["curl", "-sS", "--max-time", "5", "-w", "\n%{http_version}", *args],
        uid=APP_UID,
        gid=APP_UID,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or len(lines) < 2:
        return {"ok": False, "error": done.stderr.strip() or done.stdout}
    return {"ok": True, "version": lines[-1], **json.loads(lines[-2])}


def proto(ns: Netns, *args: str) -> dict[str, Any]:
    done = ns.run([VENV_PYTHON, PROTOAPP, *args], uid=APP_UID, gid=APP_UID, timeout=20)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _from_sidecar(answer: dict[str, Any], caller: str) -> bool:
    return (
        answer.get("ok") is True
        and answer["peer"].startswith(("127.0.0.6:", "ipv4:127.0.0.6:"))
        and f"URI={_spiffe(caller)}" in (answer.get("xfcc") or "")
    )


def _http_checks(caller: Netns, caller_sa: str, target: str) -> None:
    url = f"http://{target}:8080/p"
    h2c = curl(caller, "--http2-prior-knowledge", url)
    assert h2c.get("version") == "2" and h2c["proto"] == "HTTP/2", h2c
    assert _from_sidecar(h2c, caller_sa), h2c
    http11 = curl(caller, "--http1.1", url)
    assert http11.get("version") == "1.1" and http11["proto"] == "HTTP/1.1", http11
    assert _from_sidecar(http11, caller_sa), http11
    http10 = curl(caller, "--http1.0", url)
    # (curl says "1" for HTTP/1.0; the hop to the app is HTTP/1.1)
    assert http10.get("version") == "1", http10
    assert _from_sidecar(http10, caller_sa), http10
    # An HTTP/1.1 request offering an upgrade to h2c is answered in HTTP/1.1, not broken.
    upgrade = curl(caller, "--http2", url)
    assert upgrade.get("version") == "1.1", upgrade
    assert _from_sidecar(upgrade, caller_sa), upgrade


def _grpc_checks(caller: Netns, caller_sa: str, target: str) -> None:
    result = proto(caller, "grpc", target, GRPC_PORT, "5")
    assert result["ok"], result
    assert result["unary"]["hello"] == "mesh", result
    assert _from_sidecar({"ok": True, **result["unary"]}, caller_sa), result
    assert [m["i"] for m in result["stream"]] == [0, 1, 2, 3, 4], result
    assert all(_from_sidecar({"ok": True, **m}, caller_sa) for m in result["stream"]), result


def _checks(lab: NetnsLab) -> None:
    mesh = start_mesh(lab, app_script=PROTOAPP, app_python=VENV_PYTHON)
    client, server = mesh.client, mesh.server
    keys = (
        "http.inbound_mtls_h2.downstream_rq_http2_total",
        "http.inbound_mtls_http.downstream_rq_http1_total",
        "http.inbound_mtls_h2.downstream_cx_protocol_error",
        "http.inbound_mtls_http.downstream_cx_protocol_error",
        "listener.inbound.no_filter_chain_match",
    )
    before = {p.name: stats(p.ns, *keys) for p in (client, server)}
    for caller, caller_sa, callee in (
        (client, "client", server),  # to a STRICT pod
        (server, "server", client),  # to a PERMISSIVE pod
    ):
        try:
            _http_checks(caller.ns, caller_sa, callee.pod_net.ip)
            _grpc_checks(caller.ns, caller_sa, callee.pod_net.ip)
            echo = proto(caller.ns, "tcp", callee.pod_net.ip, TCP_PORT)
            assert echo["ok"] and echo["line"] == "ping", echo
            assert echo["peer"].startswith("127.0.0.6:"), echo
        except AssertionError:
            print("caller:", trouble(caller.ns), "callee:", trouble(callee.ns))
            raise
    after = {p.name: stats(p.ns, *keys) for p in (client, server)}
    for name in ("client", "server"):
        delta = {k: after[name][k] - before[name][k] for k in keys}
        # 1 h2c request + 2 gRPC calls, and 3 HTTP/1 requests, no protocol error anywhere
        assert delta == {
            keys[0]: 3,
            keys[1]: 3,
            keys[2]: 0,
            keys[3]: 0,
            keys[4]: 0,
        }, (name, delta)

    # A pod without a sidecar: h2c and gRPC to the PERMISSIVE pod, no identity (a forged one
    # stripped); nothing gets through to the STRICT pod.
    outside = mesh.outside.ns
    plain = curl(
        outside,
        "--http2-prior-knowledge",
        "-H",
        "x-forwarded-client-cert: URI=spiffe://cluster.local/ns/demo/sa/server",
        f"http://{client.pod_net.ip}:8080/p",
    )
    assert plain.get("version") == "2" and plain["proto"] == "HTTP/2", plain
    assert plain["peer"].startswith("127.0.0.6:") and plain["xfcc"] is None, plain
    forged = proto(outside, "grpc", client.pod_net.ip, GRPC_PORT, "2", "URI=spiffe://x")
    assert forged["ok"] and forged["unary"]["xfcc"] is None, forged
    assert [m["xfcc"] for m in forged["stream"]] == [None, None], forged
    refused = proto(outside, "grpc", server.pod_net.ip, GRPC_PORT, "1")
    assert not refused["ok"] and refused["code"] == "StatusCode.UNAVAILABLE", refused
    assert not curl(outside, "--http2-prior-knowledge", f"http://{server.pod_net.ip}:8080/")["ok"]
    # the HTTP/1.1 app of the lab's own checks is still answered by the PERMISSIVE pod
    assert app(outside, "get", client.pod_net.ip, "8080", "/plain")["status"] == 200
