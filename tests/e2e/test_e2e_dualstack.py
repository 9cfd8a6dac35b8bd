"""Dual-stack pods, for real: IPv6 and IPv4 through both sidecars with mTLS, on the same pods.

:func:`meshlab.start_mesh` with ``ipv6=True``: every pod namespace also has an IPv6 address
(fd00:5e:0::/64, only inside these namespaces), the meshed pods' ``POD_IPS`` lists both
addresses, and the mesh CIDRs contain both subnets. The pods went through ``/mutate``; their
``sidemesh init-traffic`` (``--ipv6 auto``, as injected) programs ip6tables and puts ``::6`` on
``lo``; their agents render dual-stack bootstraps and run real Envoys. The app
(:mod:`dualapp`) listens on both families and reports the peer it saw and the
``x-forwarded-client-cert`` header its sidecar set.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.conftest import envoy_binary, require_root, require_tools
from tests.support.meshlab import APP_UID, PYTHON, Mesh, checked_lab, start_mesh, stats, trouble
from tests.support.netns import Netns
from tests.support.programs import PROGRAMS

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.envoy]

DUALAPP = str(PROGRAMS / "dualapp.py")
CLIENT_ID = "spiffe://cluster.local/ns/demo/sa/client"


def get(ns: Netns, host: str, port: int, path: str) -> dict[str, Any]:
    """One request from the pod's app uid (captured by its sidecar, if it has one)."""
    done = ns.run([PYTHON, DUALAPP, "get", host, str(port), path], uid=APP_UID, gid=APP_UID)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_dual_stack_pods_mesh_ipv6_and_ipv4() -> None:
    require_root()
    require_tools("ip", "iptables-restore", "ip6tables-restore", "setpriv", "unshare")
    envoy_binary()
    with checked_lab("sm6") as lab:
        mesh = start_mesh(lab, ipv6=True, app_script=DUALAPP)
        _checks(mesh)


def _checks(mesh: Mesh) -> None:
    client, server = mesh.client, mesh.server
    server_ip6 = server.pod_net.ip6
    assert server_ip6 is not None and mesh.outside.ip6 is not None
    for pod in (client, server):
        # init-traffic (as injected: --ipv6 auto) saw the IPv6 address and acted on it
        assert "SIDEMESH_OUTPUT" in pod.ns.run(["ip6tables-save", "-t", "nat"]).stdout
        assert "inet6 ::6/128" in pod.ns.ip("-6", "addr", "show", "dev", "lo")

    keys_out = ("cluster.outbound_mesh_http.upstream_cx_total",)
    keys_in = ("listener.inbound.ssl.handshake", "cluster.inbound_app.upstream_rq_total")
    for family, host in (("IPv6", server_ip6), ("IPv4", server.pod_net.ip)):
        c0, s0 = stats(client.ns, *keys_out), stats(server.ns, *keys_in)
        answer = get(client.ns, host, 8080, f"/{family}")
        problems = (answer, trouble(client.ns), trouble(server.ns))
        assert answer["ok"] and answer["status"] == 200, problems
        # delivered by the server's sidecar from its passthrough source of that family ...
        source = "::6:" if family == "IPv6" else "127.0.0.6:"
        assert answer["peer"].startswith(source), problems
        # ... after mTLS with the client's sidecar, whose identity the app sees
        assert f"URI={CLIENT_ID}" in (answer["xfcc"] or ""), problems
        c1, s1 = stats(client.ns, *keys_out), stats(server.ns, *keys_in)
        assert {k: c1[k] - c0[k] for k in keys_out} == dict.fromkeys(keys_out, 1), family
        assert {k: s1[k] - s0[k] for k in keys_in} == dict.fromkeys(keys_in, 1), family

    # STRICT holds over IPv6 too: a pod without sidecar is refused, plaintext or not
    refused = get(mesh.outside.ns, server_ip6, 8080, "/plain6")
    assert not (refused["ok"] and refused.get("status") == 200), refused
    # the excluded inbound port (9090) bypasses the proxy over IPv6 as over IPv4
    direct = get(mesh.outside.ns, server_ip6, 9090, "/excluded6")
    assert direct["ok"] and direct["peer"] == direct["local"], direct
    # an IPv6-first cluster's kubelet probes the IPv6 address: health and rewritten probes
    # answer there too (the probe itself still checks the app the way the spec says)
    for port, path in ((15021, "/healthz/ready"), (15020, "/app-health/app/readyz")):
        assert kubelet_get(mesh, f"http://[{server_ip6}]:{port}{path}") == 200, (port, path)
    for pod in (client, server):
        assert "not on lo" not in pod.procs["sidemesh-proxy"].output()


def kubelet_get(mesh: Mesh, url: str) -> int:
    """An HTTP GET from the node namespace (as the kubelet probes a pod); the status or 0."""

    def call() -> int:
        try:
            with urllib.request.urlopen(url, timeout=3) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    status: int = mesh.node.ns.in_namespace(call)
    return status
