"""The whole chain, for real: webhook → patch → init → agent → CA → Envoy → app.

No cluster: a "node" network namespace holds a bridge; the control plane (``sidemesh serve``:
webhook + CA, with a JWKS verifier over this test's token issuer) and three pods hang off it,
each in its own namespace, with addresses that exist only in there::

    node (10.200.0.1, plays API server and kubelet)
      ├── cp       10.200.0.2   sidemesh serve  (HTTPS :8443, /mutate + /v1/certificates)
      ├── client   10.200.0.3   injected pod: sidemesh-init, sidemesh-proxy, app (PERMISSIVE)
      ├── server   10.200.0.4   injected pod (STRICT, inbound port 9090 excluded)
      ├── outside  10.200.0.5   no sidecar (a pod of a namespace without injection)
      └── ext      10.200.0.6   no sidecar, in the client's excluded outbound CIDR

The two pods are ordinary manifests sent to ``/mutate`` as AdmissionReviews over HTTPS; the
returned JSON patch is applied and :class:`podrunner.PodRunner` runs what came back. Then the
checks (1)-(8) of issue 5 §4. Certificates live 30 s, so one renewal of each proxy happens
while a stream of requests runs (check 6, in the background while the other checks run).
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
from conftest import envoy_binary, require_root, require_tools
from jwks_issuer import Issuer
from netns import PYTHON, Netns, NetnsLab
from podrunner import PodRunner, sidemesh_argv

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.envoy]

MESHAPP = str(Path(__file__).resolve().parent / "meshapp.py")
SIDEMESH = sidemesh_argv()
APP_UID = 1000
CERT_TTL = int(os.environ.get("SME2E_TTL", "30"))
#: The stream of check (6) starts a few seconds after the proxies got their first certificate
#: and must outlast the renewal at half-life (15 s).
STREAM_SECONDS = 18
TRUST_DOMAIN = "cluster.local"


def _pod(name: str, sa: str, annotations: dict[str, str], ports: list[int], **probes: Any) -> dict:
    app: dict[str, Any] = {
        "name": "app",
        "image": "example.com/app:1",
        "ports": [{"containerPort": p, "protocol": "TCP"} for p in ports],
        **probes,
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "demo", "annotations": annotations},
        "spec": {
            "serviceAccountName": sa,
            "securityContext": {"runAsUser": APP_UID, "runAsGroup": APP_UID},
            "containers": [app],
        },
    }


def _https_json(ns: Netns, url: str, cafile: Path, body: Any | None = None) -> tuple[int, Any]:
    ctx = ssl.create_default_context(cafile=str(cafile))

    def call() -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5, context=ctx) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError as exc:
            return 0, str(exc)

    result: tuple[int, Any] = ns.in_namespace(call)
    return result


def _admit(node_ns: Netns, cp_url: str, cafile: Path, pod: dict) -> dict:
    """What the API server does: send the pod to /mutate, apply the JSON patch it returns."""
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": pod["metadata"]["namespace"],
            "operation": "CREATE",
            "object": pod,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "dryRun": False,
        },
    }
    status, answer = _https_json(node_ns, f"{cp_url}/mutate", cafile, review)
    assert status == 200, answer
    response = answer["response"]
    assert response["allowed"] is True, response
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    patched: dict = jsonpatch.apply_patch(pod, patch)
    return patched


def _app(ns: Netns, *args: str, uid: int = APP_UID) -> dict:
    """Run the test client in a pod's namespace as ``uid`` (the app's, or the proxy's)."""
    done = ns.run([PYTHON, MESHAPP, *args], uid=uid, gid=uid, timeout=20)
    result: dict = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _stats(ns: Netns, *wanted: str) -> dict[str, int]:
    """Counters from the pod's Envoy admin (127.0.0.1 only, so we ask from inside the pod)."""

    def call() -> str:
        with urllib.request.urlopen("http://127.0.0.1:15000/stats", timeout=3) as resp:
            return str(resp.read().decode())

    text: str = ns.in_namespace(call)
    values = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    return {name: int(values.get(name, "0")) for name in wanted}


def _generation(cert_dir: Path) -> str:
    return (cert_dir / "..data").readlink().name


def _is_direct(answer: dict) -> bool:
    """The server saw exactly the client's own socket address: nothing sat in between."""
    return bool(answer.get("ok")) and answer.get("peer") == answer.get("local")


def test_mesh_end_to_end() -> None:
    require_root()
    require_tools("ip", "iptables", "iptables-restore", "setpriv", "unshare")
    envoy_binary()
    started = time.monotonic()
    lab = NetnsLab("sme2e")
    all_pids: set[int] = set()
    try:
        _run_mesh(lab, all_pids)
    except BaseException:
        # What each process said is the first thing one needs when this fails.
        for proc in lab._procs:
            print(f"--- {proc.ns}: {' '.join(proc.argv)[:120]}\n{proc.output()[-3000:]}")
        raise
    finally:
        for ns in lab.namespaces:
            all_pids.update(ns.pids())
        lab.close(raise_errors=False)
    # (8) everything is torn down: no namespace of ours, no process we started.
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert lab.prefix not in listed, listed
    alive = [pid for pid in all_pids if Path(f"/proc/{pid}").exists()]
    assert not alive, f"processes left behind: {alive}"
    assert time.monotonic() - started < 120


def _run_mesh(lab: NetnsLab, all_pids: set[int]) -> None:
    node = lab.node()
    cp, client_net, server_net = node.add_pod("cp"), node.add_pod("client"), node.add_pod("server")
    outside, ext = node.add_pod("outside"), node.add_pod("ext")
    subnet = str(node.subnet)

    # --- the control plane: PKI, token issuer, mesh config, `sidemesh serve` -----------------
    pki = lab.tmpdir("pki")
    subprocess.run([*SIDEMESH, "ca", "init", "--dir", str(pki)], check=True, capture_output=True)
    subprocess.run(
        [*SIDEMESH, "ca", "serving-cert", "--dir", str(pki), "--ip", cp.ip, "--ip", "127.0.0.1"],
        check=True,
        capture_output=True,
    )
    issuer = Issuer.create()
    jwks = issuer.write_jwks(lab.tmpdir("jwks") / "jwks.json")
    config = lab.tmpdir("config") / "mesh.yaml"
    config.write_text(
        json.dumps(
            {
                "ca_address": f"https://{cp.ip}:8443",
                "mesh_cidrs": [subnet],
                "proxy": {"cert_ttl_seconds": CERT_TTL},
            }
        )
    )
    serve_env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "SIDEMESH_JWKS_FILE": str(jwks),
        "SIDEMESH_JWKS_ISSUER": issuer.issuer_url,
    }
    serve = [*SIDEMESH, "serve", "--host", "0.0.0.0", "--port", "8443", "--cert-dir", str(pki)]
    cp.ns.spawn(
        [*serve, "--config", str(config), "--log-level", "warning"],
        env=serve_env,
    )
    cp_url = f"https://{cp.ip}:8443"
    deadline = time.monotonic() + 30
    while _https_json(node.ns, f"{cp_url}/readyz", pki / "ca.crt")[0] != 200:
        assert time.monotonic() < deadline, "sidemesh serve never became ready"
        time.sleep(0.1)

    # --- two ordinary manifests through /mutate, then run what came back -------------------
    client_pod = _admit(
        node.ns,
        cp_url,
        pki / "ca.crt",
        _pod(
            "client",
            "client",
            {"traffic.sidemesh.io/exclude-outbound-cidrs": f"{ext.ip}/32"},
            [8080],
        ),
    )
    server_pod = _admit(
        node.ns,
        cp_url,
        pki / "ca.crt",
        _pod(
            "server",
            "server",
            {
                "sidemesh.io/inbound-mtls": "STRICT",
                "traffic.sidemesh.io/exclude-inbound-ports": "9090",
            },
            [8080, 9090],
            readinessProbe={"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 5},
            livenessProbe={"httpGet": {"path": "/fail", "port": 8080}, "periodSeconds": 5},
            startupProbe={"tcpSocket": {"port": 9090}, "periodSeconds": 5},
        ),
    )
    for pod in (client_pod, server_pod):
        names_ = [c["name"] for c in pod["spec"]["initContainers"]]
        assert names_ == ["sidemesh-init", "sidemesh-proxy"], names_

    def token_for(namespace: str, sa: str, pod_name: str) -> str:
        return issuer.token(namespace, sa, pod_name)

    runners = {}
    for net, pod, ports in (
        (server_net, server_pod, ["8080", "9090"]),
        (client_net, client_pod, ["8080"]),
    ):
        runner = PodRunner(
            lab=lab,
            node=node,
            pod_net=net,
            pod=pod,
            app_commands={"app": [PYTHON, MESHAPP, "serve", *ports]},
            sidemesh=SIDEMESH,
            token_for=token_for,
        )
        runner.start()
        runner.procs["app"].expect("listening")
        runners[pod["metadata"]["name"]] = runner
    client, server = runners["client"], runners["server"]
    for plain in (outside, ext):
        plain.ns.spawn([PYTHON, MESHAPP, "serve", "7070", "8080"], uid=APP_UID, gid=APP_UID).expect(
            "listening"
        )
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
    c0, s0 = _stats(client.ns, *out_keys), _stats(server.ns, *in_keys, *tls_keys)
    for _ in range(5):
        answer = _app(client.ns, "get", server_net.ip, "8080", "/hello")
        assert answer["ok"] and answer["status"] == 200, answer
        assert answer["peer"].startswith("127.0.0.6:"), answer  # delivered by the server's Envoy
        assert f"URI={client_id}" in (answer["xfcc"] or ""), answer
    c1, s1 = _stats(client.ns, *out_keys), _stats(server.ns, *in_keys, *tls_keys)
    assert {k: c1[k] - c0[k] for k in out_keys} == dict.fromkeys(out_keys, 5)
    assert {k: s1[k] - s0[k] for k in in_keys + tls_keys} == dict.fromkeys(in_keys + tls_keys, 5)
    # (5) the proxy uid is never captured: as uid 1337 the client reaches a meshed address
    # directly; the app uid's connection to the same address is taken by the proxy.
    direct = _app(client.ns, "get", outside.ip, "7070", "/as-proxy-uid", uid=1337)
    assert _is_direct(direct), direct
    assert not _is_direct(_app(client.ns, "get", outside.ip, "7070", "/as-app-uid"))

    # (6) certificate renewal during a stream of requests: start it now, check it at the end.
    client_certs = client.volume_dirs["sidemesh-certs"]
    server_certs = server.volume_dirs["sidemesh-certs"]
    gens = (_generation(client_certs), _generation(server_certs))
    stream = client.ns.spawn(
        [PYTHON, MESHAPP, "stream", server_net.ip, "8080", str(STREAM_SECONDS)],
        uid=APP_UID,
        gid=APP_UID,
    )

    # (2) a pod without sidecar: refused by the STRICT server, served by the PERMISSIVE client
    # (with no identity, and a forged identity header stripped).
    refused = _app(outside.ns, "get", server_net.ip, "8080", "/plain")
    assert not (refused.get("ok") and refused.get("status") == 200), refused
    served = _app(
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
        _stats(server.ns, "listener.inbound.no_filter_chain_match")[
            "listener.inbound.no_filter_chain_match"
        ]
        >= 1
    )

    # (3) the excluded inbound port and the excluded outbound CIDR bypass the proxy.
    assert _is_direct(_app(outside.ns, "get", server_net.ip, "9090", "/excluded-in"))
    assert _is_direct(_app(client.ns, "get", ext.ip, "7070", "/excluded-out"))

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
    assert stream_out["failures"] == [], stream_out
    assert stream_out["ok"] > 20, stream_out
    assert _generation(client_certs) != gens[0], "client proxy never renewed"
    assert _generation(server_certs) != gens[1], "server proxy never renewed"
    # The server app saw the client's certificate change (x-forwarded-client-cert Hash=...).
    assert len(stream_out["xfcc"]) >= 2, stream_out
    assert all(f"URI={client_id}" in x for x in stream_out["xfcc"]), stream_out

    # (7) SIGTERM drains, then stops: with a connection still open the proxy stays up and
    # reports not-ready; once it closes the proxy exits 0, well before the drain time.
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
    t0 = time.monotonic()
    assert proxy.popen.wait(timeout=10) == 0, proxy.output()
    assert time.monotonic() - t0 < 3
    assert not [p for p in client.ns.pids() if _comm(p) == "envoy"], "Envoy outlived its agent"
    for ns in lab.namespaces:
        all_pids.update(ns.pids())


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
