"""A meshed "cluster" in network namespaces: shared by the end-to-end test and the benchmark.

:func:`start_mesh` builds, inside a :class:`netns.NetnsLab`::

    node (10.200.0.1, plays API server and kubelet)
      ├── cp       10.200.0.2   sidemesh serve  (HTTPS :8443, /mutate + /v1/certificates)
      ├── client   10.200.0.3   injected pod: sidemesh-init, sidemesh-proxy, app (PERMISSIVE)
      ├── server   10.200.0.4   injected pod (STRICT, inbound port 9090 excluded)
      ├── outside  10.200.0.5   no sidecar (a pod of a namespace without injection)
      └── ext      10.200.0.6   no sidecar, in the client's excluded outbound CIDR

The two pods are ordinary manifests sent to ``/mutate`` as AdmissionReviews over HTTPS; the
returned JSON patch is applied and :class:`podrunner.PodRunner` runs what came back. The CA
behind ``sidemesh serve`` verifies the proxies' tokens with a JWKS verifier over this lab's own
token issuer (:mod:`jwks_issuer`).
"""

from __future__ import annotations

import base64
import json
import re
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonpatch

from tests.support.jwks_issuer import Issuer
from tests.support.netns import PYTHON, Netns, NetnsLab, Node, Pod, Proc
from tests.support.podrunner import PodRunner, sidemesh_argv
from tests.support.programs import PROGRAMS

__all__ = [
    "APP_UID",
    "MESHAPP",
    "PYTHON",
    "SIDEMESH",
    "ControlPlane",
    "Mesh",
    "admit",
    "app",
    "checked_lab",
    "debug_json",
    "envoy_pids",
    "generation",
    "https_json",
    "is_direct",
    "pod_manifest",
    "start_control_plane",
    "start_discovery",
    "start_mesh",
    "stats",
    "trouble",
    "with_pod_ips",
    "write_manifest",
]

MESHAPP = str(PROGRAMS / "meshapp.py")


@contextmanager
def checked_lab(prefix: str) -> Iterator[NetnsLab]:
    """A :class:`NetnsLab` whose teardown is itself checked.

    On failure, what each process said is printed first (the first thing one needs). On the way
    out, every namespace is deleted and then verified gone, and every process that ever ran in
    one of them verified dead: a test that leaves something behind fails.
    """
    lab = NetnsLab(prefix)
    all_pids: set[int] = set()
    try:
        yield lab
    except BaseException:
        for proc in lab.processes:
            print(f"--- {proc.ns}: {' '.join(proc.argv)[:120]}\n{proc.output()[-3000:]}")
        raise
    finally:
        for ns in lab.namespaces:
            all_pids.update(ns.pids())
        lab.close(raise_errors=False)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert lab.prefix not in listed, listed
    alive = {pid: about for pid in all_pids if (about := _living(pid))}
    assert not alive, f"processes left behind: {alive}"


def _living(pid: int) -> str:
    """What a still-running ``pid`` is (name, state, parent, argv); "" when it is gone or a
    zombie: dead, only waiting for its new parent (init, once orphaned) to reap it."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return ""
    fields = [line for line in status if line.startswith(("Name:", "State:", "PPid:"))]
    if any(line.startswith("State:") and "Z" in line.split()[1] for line in fields):
        return ""
    return " ".join([*fields, argv])


SIDEMESH = sidemesh_argv()
APP_UID = 1000


def pod_manifest(
    name: str, sa: str, annotations: dict[str, str], ports: list[int], **probes: Any
) -> dict[str, Any]:
    """An ordinary Pod, as a user writes it (the app's image is replaced when it runs)."""
    container: dict[str, Any] = {
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
            "containers": [container],
        },
    }


def https_json(ns: Netns, url: str, cafile: Path, body: Any | None = None) -> tuple[int, Any]:
    """GET (or POST ``body``) over HTTPS from inside ``ns``, verifying with ``cafile``."""
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


def admit(node_ns: Netns, cp_url: str, cafile: Path, pod: dict[str, Any]) -> dict[str, Any]:
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
    status, answer = https_json(node_ns, f"{cp_url}/mutate", cafile, review)
    assert status == 200, answer
    response = answer["response"]
    assert response["allowed"] is True, response
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    patched: dict[str, Any] = jsonpatch.apply_patch(pod, patch)
    return patched


def app(ns: Netns, *args: str, uid: int = APP_UID) -> dict[str, Any]:
    """Run the test client in a pod's namespace as ``uid`` (the app's, or the proxy's)."""
    done = ns.run([PYTHON, MESHAPP, *args], uid=uid, gid=uid, timeout=20)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def stats(ns: Netns, *wanted: str) -> dict[str, int]:
    """Counters from the pod's Envoy admin (127.0.0.1 only, so we ask from inside the pod)."""

    def call() -> str:
        with urllib.request.urlopen("http://127.0.0.1:15000/stats", timeout=3) as resp:
            return str(resp.read().decode())

    text: str = ns.in_namespace(call)
    values = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    return {name: int(values.get(name, "0")) for name in wanted}


def trouble(ns: Netns) -> dict[str, int]:
    """The pod's Envoy counters of failures (TLS, resets, connect failures) that are not zero:
    what to print when a request failed."""

    def call() -> str:
        with urllib.request.urlopen("http://127.0.0.1:15000/stats", timeout=3) as resp:
            return str(resp.read().decode())

    text: str = ns.in_namespace(call)
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.isdigit() and int(value) and re.search(r"fail|error|reset|timeout|no_", name):
            out[name] = int(value)
    return out


def generation(cert_dir: Path) -> str:
    """Which certificate generation the proxy's ``..data`` points at."""
    return (cert_dir / "..data").readlink().name


def is_direct(answer: dict[str, Any]) -> bool:
    """The server saw exactly the client's own socket address: nothing sat in between."""
    return bool(answer.get("ok")) and answer.get("peer") == answer.get("local")


def envoy_pids(ns: Netns) -> list[int]:
    out = []
    for pid in ns.pids():
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "envoy":
                out.append(pid)
        except OSError:
            pass
    return out


@dataclass
class Mesh:
    node: Node
    cp: Pod
    client: PodRunner
    server: PodRunner
    outside: Pod
    ext: Pod
    pki: Path


def _preflight() -> None:
    """The proxy container runs ``sidemesh`` as uid 1337, so the venv's interpreter must be
    usable by that uid (not the case for a checkout inside a 0700 home directory)."""
    done = subprocess.run(
        ["setpriv", "--reuid=1337", "--regid=1337", "--clear-groups", *SIDEMESH, "--version"],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"uid 1337 cannot run {' '.join(SIDEMESH)} ({done.stderr.strip()}): put the "
            "checkout and its virtualenv where other users can read them"
        )


def with_pod_ips(pod: dict[str, Any], ips: list[str]) -> None:
    """The kubelet fills ``status.podIPs`` with every address of a dual-stack pod; the test
    runner knows only one, so such a pod gets the whole list as a plain env value."""
    spec = pod["spec"]
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        for item in container.get("env", []):
            if item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIPs":
                del item["valueFrom"]
                item["value"] = ",".join(ips)


@dataclass
class ControlPlane:
    """``sidemesh serve`` (webhook + CA) in the ``cp`` pod, with its PKI and token issuer."""

    node: Node
    cp: Pod
    pki: Path
    url: str
    issuer: Issuer
    #: The mesh config ``sidemesh serve`` reads (``sidemesh discovery --config`` may too).
    config: Path

    def token_for(self, namespace: str, sa: str, pod_name: str) -> str:
        return self.issuer.token(namespace, sa, pod_name)

    def admit(self, pod: dict[str, Any]) -> dict[str, Any]:
        return admit(self.node.ns, self.url, self.pki / "ca.crt", pod)


def start_control_plane(
    lab: NetnsLab,
    node: Node,
    cp: Pod,
    *,
    cert_ttl: int | None = None,
    discovery_address: str = "",
    extra_config: Mapping[str, Any] | None = None,
) -> ControlPlane:
    """PKI, token issuer, mesh config (the node's subnets are the mesh, plus
    ``extra_config``), ``sidemesh serve``."""
    pki = lab.tmpdir("pki")
    subprocess.run([*SIDEMESH, "ca", "init", "--dir", str(pki)], check=True, capture_output=True)
    subprocess.run(
        [*SIDEMESH, "ca", "serving-cert", "--dir", str(pki), "--ip", cp.ip, "--ip", "127.0.0.1"],
        check=True,
        capture_output=True,
    )
    issuer = Issuer.create()
    jwks = issuer.write_jwks(lab.tmpdir("jwks") / "jwks.json")
    mesh_config: dict[str, Any] = {
        "ca_address": f"https://{cp.ip}:8443",
        # These labs test the static bootstrap (the fallback mode); the discovery lab runs the
        # control plane and sets its address.
        "discovery_address": discovery_address,
        "mesh_cidrs": [str(node.subnet), *([str(node.subnet6)] if node.subnet6 else [])],
    }
    if cert_ttl is not None:
        mesh_config["proxy"] = {"cert_ttl_seconds": cert_ttl}
    mesh_config.update(extra_config or {})
    config = lab.tmpdir("config") / "mesh.yaml"
    config.write_text(json.dumps(mesh_config))
    serve_env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "SIDEMESH_JWKS_FILE": str(jwks),
        "SIDEMESH_JWKS_ISSUER": issuer.issuer_url,
    }
    serve = [*SIDEMESH, "serve", "--host", "0.0.0.0", "--port", "8443", "--cert-dir", str(pki)]
    cp.ns.spawn([*serve, "--config", str(config), "--log-level", "warning"], env=serve_env)
    cp_url = f"https://{cp.ip}:8443"
    deadline = time.monotonic() + 30
    while https_json(node.ns, f"{cp_url}/readyz", pki / "ca.crt")[0] != 200:
        if time.monotonic() > deadline:
            raise TimeoutError("sidemesh serve never became ready")
        time.sleep(0.1)
    return ControlPlane(node, cp, pki, cp_url, issuer, config)


def start_discovery(cp: Pod, pki: Path, mesh_dir: Path, *extra: str) -> Proc:
    """``sidemesh discovery`` in the ``cp`` pod on the manifests of ``mesh_dir`` (xDS on
    :15012, debug on :15014 there), once its debug port answers."""
    proc = cp.ns.spawn(
        [*SIDEMESH, "discovery", "--listen", "0.0.0.0:15012", "--cert-dir", str(pki),
         "--mesh-dir", str(mesh_dir), "--poll-interval", "0.2", "--log-level", "warning",
         *extra],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )  # fmt: skip
    cp.ns.wait_port(15014)
    return proc


def write_manifest(mesh_dir: Path, name: str, obj: Any) -> None:
    """``obj`` as ``<name>.json`` in the directory the control plane watches, in one rename."""
    tmp = mesh_dir / f".{name}.tmp"
    tmp.write_text(json.dumps(obj))
    tmp.rename(mesh_dir / f"{name}.json")


def debug_json(cp: Pod, path: str) -> Any:
    """``GET http://127.0.0.1:15014<path>`` of the control plane in ``cp``, as JSON."""

    def call() -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:15014{path}", timeout=5) as resp:
            return json.loads(resp.read())

    return cp.ns.in_namespace(call)


def start_mesh(
    lab: NetnsLab,
    *,
    cert_ttl: int | None = None,
    ipv6: bool = False,
    app_script: str = MESHAPP,
    app_python: str = PYTHON,
    kubelet_env: Callable[[Pod], Mapping[str, str]] | None = None,
    discovery_address: str = "",
) -> Mesh:
    """``ipv6``: dual-stack pods (every pod also gets an IPv6 address, the mesh CIDRs include
    the IPv6 subnet). ``app_script`` runs as the meshed pods' app (``serve PORT...``), under
    ``app_python`` (the venv's interpreter for an app that needs more than the stdlib).
    ``kubelet_env``: given the sidecar-less ``outside`` pod, the variables the kubelet adds to
    every container of the meshed pods (e.g. ``KUBERNETES_SERVICE_HOST`` pointing at it)."""
    _preflight()
    node = lab.node(ipv6=ipv6)
    cp, client_net, server_net = node.add_pod("cp"), node.add_pod("client"), node.add_pod("server")
    outside, ext = node.add_pod("outside"), node.add_pod("ext")

    plane = start_control_plane(
        lab, node, cp, cert_ttl=cert_ttl, discovery_address=discovery_address
    )
    cp_url, pki, issuer = plane.url, plane.pki, plane.issuer

    # --- two ordinary manifests through /mutate, then run what came back ---------------
    client_pod = admit(
        node.ns,
        cp_url,
        pki / "ca.crt",
        pod_manifest(
            "client",
            "client",
            {"traffic.sidemesh.io/exclude-outbound-cidrs": f"{ext.ip}/32"},
            [8080],
        ),
    )
    server_pod = admit(
        node.ns,
        cp_url,
        pki / "ca.crt",
        pod_manifest(
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
        init = [c["name"] for c in pod["spec"]["initContainers"]]
        assert init == ["sidemesh-init", "sidemesh-proxy"], init

    def token_for(namespace: str, sa: str, pod_name: str) -> str:
        return issuer.token(namespace, sa, pod_name)

    runners = {}
    for net, pod, ports in (
        (server_net, server_pod, ["8080", "9090"]),
        (client_net, client_pod, ["8080"]),
    ):
        if net.ip6 is not None:
            with_pod_ips(pod, [net.ip, net.ip6])
        runner = PodRunner(
            lab=lab,
            node=node,
            pod_net=net,
            pod=pod,
            app_commands={"app": [app_python, app_script, "serve", *ports]},
            sidemesh=SIDEMESH,
            token_for=token_for,
            cluster_env=kubelet_env(outside) if kubelet_env else {},
        )
        runner.start()
        runner.procs["app"].expect("listening")
        runners[pod["metadata"]["name"]] = runner
    for plain in (outside, ext):
        plain.ns.spawn([PYTHON, MESHAPP, "serve", "7070", "8080"], uid=APP_UID, gid=APP_UID).expect(
            "listening"
        )
    return Mesh(node, cp, runners["client"], runners["server"], outside, ext, pki)
