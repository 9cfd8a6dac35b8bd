"""CNI mode end to end: the sidecar's capture comes from the node, not from the pod.

A node namespace where the runtime's part is played by the real reference plugins (bridge,
host-local, loopback) and sidemesh's plugin is chained after them by ``sidemesh cni install``
(tests/support/cni_lab.py); the API server stand-in holds the pods as the webhook admitted
them. ``sidemesh serve`` runs in CNI mode (mesh config ``cni: true``); two ordinary manifests
that follow Pod Security ``restricted`` go through ``/mutate`` over HTTPS and come back with an
unprivileged ``sidemesh-validate`` init container instead of the NET_ADMIN one — and still pass
``restricted``. Their sandboxes get their network (and capture) from the chain; then the pod
runner runs what the webhook's patch made of them: the validate check, the proxy with a
certificate from the CA, the app. The data-plane checks of the classic end-to-end test follow.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import envoy_binary, require, require_root, require_tools
from tests.support.cni_lab import CniNode, built_plugin, cni_node
from tests.support.cni_runtime import REFERENCE_DIR
from tests.support.meshlab import (
    APP_UID,
    MESHAPP,
    PYTHON,
    SIDEMESH,
    admit,
    app,
    checked_lab,
    https_json,
    is_direct,
    stats,
)
from tests.support.netns import NetnsLab, Pod
from tests.support.pod_security import restricted_violations
from tests.support.podrunner import PodRunner
from webhook import names

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.envoy]

TRUST_DOMAIN = "cluster.local"


def manifest(
    name: str, annotations: dict[str, str], ports: list[int], **probes: Any
) -> dict[str, Any]:
    """An ordinary Pod whose author follows Pod Security ``restricted``."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "demo", "annotations": annotations},
        "spec": {
            "serviceAccountName": name,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": APP_UID,
                "runAsGroup": APP_UID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "app",
                    "image": "example.com/app:1",
                    "ports": [{"containerPort": p, "protocol": "TCP"} for p in ports],
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    **probes,
                }
            ],
        },
    }


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_root()
    require_tools("ip", "iptables-save", "iptables-restore", "setpriv", "unshare")
    require((REFERENCE_DIR / "bridge").is_file(), "containernetworking-plugins not installed")
    envoy_binary()
    return built_plugin(tmp_path_factory.mktemp("cni-plugin"))


def test_cni_mode_mesh_end_to_end_standin(plugin: Path) -> None:
    with checked_lab("smcnie2e") as lab:
        node = cni_node(lab)
        try:
            node.install(plugin)
            _checks(lab, node)
        finally:
            node.close()


def _serve(lab: NetnsLab, node: CniNode) -> tuple[Pod, str, Path]:
    """The control plane in its own sandbox (sidemesh-system: the plugin never looks it up)."""
    cp = node.add_pod(None, "cp", names.CONTROL_PLANE_NAMESPACE, "sidemesh-0")
    pki = lab.tmpdir("pki")
    subprocess.run([*SIDEMESH, "ca", "init", "--dir", str(pki)], check=True, capture_output=True)
    subprocess.run(
        [*SIDEMESH, "ca", "serving-cert", "--dir", str(pki), "--ip", cp.ip],
        check=True,
        capture_output=True,
    )
    issuer = node.standin.issuer
    jwks = issuer.write_jwks(lab.tmpdir("jwks") / "jwks.json")
    config = lab.tmpdir("config") / "mesh.yaml"
    config.write_text(
        json.dumps(
            {
                "cni": True,
                "ca_address": f"https://{cp.ip}:8443",
                "mesh_cidrs": [str(node.subnet)],
                "discovery_address": "",  # the static bootstrap: no control plane in this lab
            }
        )
    )
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "SIDEMESH_JWKS_FILE": str(jwks),
        "SIDEMESH_JWKS_ISSUER": issuer.issuer_url,
    }
    serve = [*SIDEMESH, "serve", "--host", "0.0.0.0", "--port", "8443", "--cert-dir", str(pki)]
    cp.ns.spawn([*serve, "--config", str(config), "--log-level", "warning"], env=env)
    url = f"https://{cp.ip}:8443"
    deadline = time.monotonic() + 30
    while https_json(node.ns, f"{url}/readyz", pki / "ca.crt")[0] != 200:
        if time.monotonic() > deadline:
            raise TimeoutError("sidemesh serve never became ready")
        time.sleep(0.1)
    return cp, url, pki


def _meshed(
    lab: NetnsLab, node: CniNode, url: str, pki: Path, pod: dict[str, Any], ports: list[str]
) -> PodRunner:
    admitted = admit(node.ns, url, pki / "ca.crt", pod)
    spec = admitted["spec"]
    assert [c["name"] for c in spec["initContainers"]] == [
        names.VALIDATE_CONTAINER,
        names.PROXY_CONTAINER,
    ]
    assert restricted_violations(spec) == [], "CNI mode keeps the pod restricted"
    name = admitted["metadata"]["name"]
    net = node.add_pod(admitted, name, "demo", name)
    runner = PodRunner(
        lab=lab,
        node=node.node,
        pod_net=net,
        pod=admitted,
        app_commands={"app": [PYTHON, MESHAPP, "serve", *ports]},
        sidemesh=SIDEMESH,
        token_for=node.standin.issuer.token,
    )
    runner.start()  # the validate check runs first, unprivileged: it passes
    runner.procs["app"].expect("listening")
    return runner


def _nat(pod: Pod) -> str:
    return pod.ns.run(["iptables-save", "-t", "nat"]).stdout


def _plain(node: CniNode, name: str) -> Pod:
    """A pod of a namespace without injection: the plugin passes it through."""
    pod = manifest(name, {}, [7070])
    pod["metadata"]["namespace"] = "plain"
    net = node.add_pod(pod, name, "plain", name)
    net.ns.spawn([PYTHON, MESHAPP, "serve", "7070", "8080"], uid=APP_UID, gid=APP_UID).expect(
        "listening"
    )
    assert "SIDEMESH" not in _nat(net), "a pod that is not injected gets no rules"
    return net


def _checks(lab: NetnsLab, node: CniNode) -> None:
    _, url, pki = _serve(lab, node)
    outside, ext = _plain(node, "outside"), _plain(node, "ext")
    server = _meshed(
        lab,
        node,
        url,
        pki,
        manifest(
            "server",
            {
                "sidemesh.io/inbound-mtls": "STRICT",
                "traffic.sidemesh.io/exclude-inbound-ports": "9090",
            },
            [8080, 9090],
            readinessProbe={"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 5},
        ),
        ["8080", "9090"],
    )
    client = _meshed(
        lab,
        node,
        url,
        pki,
        manifest("client", {"traffic.sidemesh.io/exclude-outbound-cidrs": f"{ext.ip}/32"}, [8080]),
        ["8080"],
    )

    # client app → server app through both sidecars with mTLS: the server app sees the client's
    # SPIFFE id, delivered by the server's Envoy from 127.0.0.6
    client_id = f"spiffe://{TRUST_DOMAIN}/ns/demo/sa/client"
    before = stats(server.ns, "listener.inbound.ssl.handshake")
    for _ in range(3):
        answer = app(client.ns, "get", server.pod_net.ip, "8080", "/hello")
        assert answer["ok"] and answer["status"] == 200, answer
        assert answer["peer"].startswith("127.0.0.6:"), answer
        assert f"URI={client_id}" in (answer["xfcc"] or ""), answer
    after = stats(server.ns, "listener.inbound.ssl.handshake")
    assert after["listener.inbound.ssl.handshake"] - before["listener.inbound.ssl.handshake"] == 3

    # STRICT still refuses plaintext from a pod without sidecar; PERMISSIVE serves it
    refused = app(outside.ns, "get", server.pod_net.ip, "8080", "/plain")
    assert not (refused.get("ok") and refused.get("status") == 200), refused
    served = app(outside.ns, "get", client.pod_net.ip, "8080", "/plain")
    assert served["ok"] and served["peer"].startswith("127.0.0.6:"), served

    # the proxy's uid is never captured; the app's is; the excluded inbound port bypasses
    assert is_direct(app(client.ns, "get", outside.ip, "7070", "/as-proxy", uid=1337))
    assert not is_direct(app(client.ns, "get", outside.ip, "7070", "/as-app"))
    assert is_direct(app(outside.ns, "get", server.pod_net.ip, "9090", "/excluded-in"))
    assert is_direct(app(client.ns, "get", ext.ip, "7070", "/excluded-out"))

    # the kubelet's probes reach the proxy's ports, and the rewritten app probe runs the app's
    assert server.kubelet_get(15021, "/healthz/ready")[0] == 200
    assert server.kubelet_get(15020, "/app-health/app/readyz") == (200, "app answered 200\n")

    # the sandbox goes away: the runtime stops the containers, then DEL through the chain
    for proc in client.procs.values():
        proc.stop()
    node.runtime.delete(client.pod_net.ns, "demo", "client")
    assert "SIDEMESH" not in _nat(client.pod_net), "DEL leaves no rule behind"
