"""The whole chain, for real: webhook → patch → init → agent → CA → Envoy → app.

No cluster: :func:`tests.support.meshlab.start_mesh` builds a node namespace with a bridge,
the control plane (``sidemesh serve``: webhook + CA) and pods in their own network namespaces,
with addresses that exist only in there. The two meshed pods are ordinary manifests that went
through ``/mutate`` over HTTPS; what runs is what the webhook's patch made of them. Then eight
checks, (1)-(8) below: mTLS, STRICT/PERMISSIVE, exclusions, probes, the proxy uid, renewal
during a stream, drain on SIGTERM and a clean teardown. Certificates live 30 s, so each proxy
renews once while a stream of requests runs (check 6, in the background meanwhile).
"""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.conftest import envoy_binary, require_root, require_tools
from tests.support.meshlab import (
    APP_UID,
    MESHAPP,
    PYTHON,
    app,
    checked_lab,
    envoy_pids,
    generation,
    is_direct,
    start_mesh,
    stats,
    trouble,
)
from tests.support.netns import NetnsLab

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.envoy]

CERT_TTL = int(os.environ.get("SME2E_TTL", "30"))
#: The stream of check (6) starts a few seconds after the proxies got their first certificate
#: and must outlast the renewal at half-life (15 s).
STREAM_SECONDS = 18
TRUST_DOMAIN = "cluster.local"


def test_mesh_end_to_end() -> None:
    require_root()
    require_tools("ip", "iptables", "iptables-restore", "setpriv", "unshare")
    envoy_binary()
    # (8) everything is torn down: checked_lab verifies no namespace or process is left.
    with checked_lab("sme2e") as lab:
        _checks(lab)


def _checks(lab: NetnsLab) -> None:
    mesh = start_mesh(lab, cert_ttl=CERT_TTL)
    client, server = mesh.client, mesh.server
    server_net, client_net, outside, ext = server.pod_net, client.pod_net, mesh.outside, mesh.ext
    client_id = f"spiffe://{TRUST_DOMAIN}/ns/demo/sa/client"

    # (1) client app → server app by IP:port, through both sidecars with mTLS; the server app
    # sees the client's SPIFFE id. (5) and every counter shows exactly one pass per request:
    # the proxies' own connections (uid 1337, from 127.0.0.6) were never captured again.
    out_keys = (
        "listener.outbound.downstream_cx_total",
        "cluster.outbound_mesh_http.upstream_cx_total",
    )
    in_keys = ("listener.inbound.downstream_cx_total", "cluster.inbound_app.upstream_rq_total")
    tls_keys = ("listener.inbound.ssl.handshake",)
    c0, s0 = stats(client.ns, *out_keys), stats(server.ns, *in_keys, *tls_keys)
    for _ in range(5):
        answer = app(client.ns, "get", server_net.ip, "8080", "/hello")
        assert answer["ok"] and answer["status"] == 200, answer
        assert answer["peer"].startswith("127.0.0.6:"), answer  # delivered by the server's Envoy
        assert f"URI={client_id}" in (answer["xfcc"] or ""), answer
    c1, s1 = stats(client.ns, *out_keys), stats(server.ns, *in_keys, *tls_keys)
    assert {k: c1[k] - c0[k] for k in out_keys} == dict.fromkeys(out_keys, 5)
    assert {k: s1[k] - s0[k] for k in in_keys + tls_keys} == dict.fromkeys(in_keys + tls_keys, 5)
    # (5) the proxy uid is never captured: as uid 1337 the client reaches a meshed address
    # directly; the app uid's connection to the same address is taken by the proxy.
    direct = app(client.ns, "get", outside.ip, "7070", "/as-proxy-uid", uid=1337)
    assert is_direct(direct), direct
    assert not is_direct(app(client.ns, "get", outside.ip, "7070", "/as-app-uid"))

    # (6) certificate renewal during a stream of requests: start it now, check it at the end.
    client_certs = client.volume_dirs["sidemesh-certs"]
    server_certs = server.volume_dirs["sidemesh-certs"]
    gens = (generation(client_certs), generation(server_certs))
    stream = client.ns.spawn(
        [PYTHON, MESHAPP, "stream", server_net.ip, "8080", str(STREAM_SECONDS)],
        uid=APP_UID,
        gid=APP_UID,
    )

    # (2) a pod without sidecar: refused by the STRICT server, served by the PERMISSIVE client
    # (with no identity, and a forged identity header stripped).
    refused = app(outside.ns, "get", server_net.ip, "8080", "/plain")
    assert not (refused.get("ok") and refused.get("status") == 200), refused
    served = app(
        outside.ns,
        "get",
        client_net.ip,
        "8080",
        "/plain",
        "x-forwarded-client-cert: URI=spiffe://x",
    )
    assert served["ok"] and served["status"] == 200, served
    assert served["peer"].startswith("127.0.0.6:") and served["xfcc"] is None, served
    assert (
        stats(server.ns, "listener.inbound.no_filter_chain_match")[
            "listener.inbound.no_filter_chain_match"
        ]
        >= 1
    )

    # (3) the excluded inbound port and the excluded outbound CIDR bypass the proxy.
    assert is_direct(app(outside.ns, "get", server_net.ip, "9090", "/excluded-in"))
    assert is_direct(app(client.ns, "get", ext.ip, "7070", "/excluded-out"))

    # (4) the rewritten probes, called as the kubelet calls them (node → pod:15020), run the
    # app's original checks: readiness GET /ready → 200, liveness GET /fail → the app's 500,
    # startup tcpSocket 9090 → 200. The probe port itself is never captured.
    assert server.kubelet_get(15020, "/app-health/app/readyz") == (200, "app answered 200\n")
    assert server.kubelet_get(15020, "/app-health/app/livez")[0] == 500
    assert server.kubelet_get(15020, "/app-health/app/startupz")[0] == 200
    assert server.kubelet_get(15020, "/app-health/app/nope")[0] == 404
    assert server.kubelet_get(15021, "/healthz/ready")[0] == 200
    assert "envoy_server_live" in server.kubelet_get(15090, "/stats/prometheus")[1]

    # (6) continued: zero failures, and both proxies rotated while the stream ran.
    stream_out = json.loads(stream.expect('"failures"', timeout=STREAM_SECONDS + 30))
    assert stream_out["failures"] == [], (stream_out, trouble(client.ns), trouble(server.ns))
    assert stream_out["ok"] > 20, stream_out
    assert generation(client_certs) != gens[0], "client proxy never renewed"
    assert generation(server_certs) != gens[1], "server proxy never renewed"
    # The server app saw the client's certificate change (x-forwarded-client-cert Hash=...).
    assert len(stream_out["xfcc"]) >= 2, stream_out
    assert all(f"URI={client_id}" in x for x in stream_out["xfcc"]), stream_out

    # (7) SIGTERM drains, then stops: with a connection still open the proxy stays up and
    # reports not-ready; once it closes the proxy exits 0 without waiting out the drain time.
    flag = lab.tmpdir("flags") / "release"
    hold = client.ns.spawn(
        [PYTHON, MESHAPP, "hold", server_net.ip, "8080", str(flag)], uid=APP_UID, gid=APP_UID
    )
    assert json.loads(hold.expect('"held"'))["status"] == 200
    proxy = client.procs["sidemesh-proxy"]
    proxy.signal(15)
    time.sleep(1.0)
    assert proxy.running(), proxy.output()
    assert client.kubelet_get(15021, "/healthz/ready")[0] == 503
    flag.touch()
    hold.expect("closed")
    assert proxy.popen.wait(timeout=30) == 0, proxy.output()
    # It stopped because the last connection closed, not because the drain time ran out.
    assert "drained: no open connections left" in proxy.output(), proxy.output()
    assert "drain time over" not in proxy.output(), proxy.output()
    assert not envoy_pids(client.ns), "Envoy outlived its agent"
