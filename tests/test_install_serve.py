"""What `sidemesh install` puts in the cluster starts a working webhook.

No kubelet here, so the test plays its part: it takes the objects the install would apply,
lays the Deployment's volumes out as files exactly as the kubelet would (projected Secret items,
the ConfigMap, mode 0440), and runs the container's own command line, with only addresses and
mount roots changed. Then it calls the server the way the API server does: HTTPS to the
Service's DNS name, trusting only the webhook's ``caBundle``. As root, the server also runs as
the pod's uid and gid with the fsGroup as its only supplementary group, so the file modes are
proven readable and the read-only certificate directory survivable.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import REPO, require_root, require_tools
from tests.support.apiserver_standin import APIServerStandin
from tests.support.jwks_issuer import Issuer
from tests.support.ports import free_port
from webhook import names
from webhook.install.cluster import Options, install
from webhook.install.runner import Completed

IMAGE = "registry.example/team/sidemesh:e2e"
SERVICE_HOST = f"{names.SERVICE_NAME}.{names.CONTROL_PLANE_NAMESPACE}.svc"

Obj = dict[str, Any]


def installed_objects(cert_dir: Path) -> list[Obj]:
    """Everything `sidemesh install --image IMAGE` applies to an empty cluster (the API server
    STAND-IN holds no Secret yet), keys included."""
    applied: list[Obj] = []

    def run(argv: Sequence[str], stdin: str | None = None) -> Completed:
        if "apply" in argv and stdin:
            applied.extend(d for d in yaml.safe_load_all(stdin) if d)
        return Completed(0, "")

    out = err = open(os.devnull, "w")  # noqa: SIM115 - closed below
    readable = tuple(
        (names.CONTROL_PLANE_NAMESPACE, s)
        for s in ("sidemesh-ca", "sidemesh-tls", "sidemesh-discovery-tls", "sidemesh-ratelimit-tls")
    )
    standin = APIServerStandin(
        cert_dir.parent / "standin", Issuer.create(algorithm="ES256"), allowed_secrets=readable
    )
    try:
        with standin:
            install(
                Options(cert_dir=cert_dir, image=IMAGE),
                run=run,
                kube=standin.client,
                now=lambda: datetime.now(UTC),
                out=out,
                err=err,
            )
    finally:
        out.close()
    return applied


def find(objects: list[Obj], kind: str, name: str | None = None) -> Obj:
    return next(o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"]))


def lay_out_volumes(objects: list[Obj], root: Path, group: int | None) -> dict[str, Path]:
    """The kubelet's job: each mounted volume as a directory of files; mountPath → directory."""
    deployment = find(objects, "Deployment", names.SERVICE_NAME)
    spec = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    dirs: dict[str, Path] = {}
    for mount in spec["containers"][0]["volumeMounts"]:
        volume = volumes[mount["name"]]
        d = root / mount["name"]
        d.mkdir()
        files: dict[str, bytes] = {}
        mode = 0o644
        if "projected" in volume:
            mode = volume["projected"]["defaultMode"]
            for source in volume["projected"]["sources"]:
                secret = find(objects, "Secret", source["secret"]["name"])
                for item in source["secret"]["items"]:
                    files[item["path"]] = base64.b64decode(secret["data"][item["key"]])
        elif "configMap" in volume:
            cm = find(objects, "ConfigMap", volume["configMap"]["name"])
            files = {k: v.encode() for k, v in cm["data"].items()}
        for name, data in files.items():
            (d / name).write_bytes(data)
            (d / name).chmod(mode)
            if group is not None:
                os.chown(d / name, 0, group)
        if mount.get("readOnly") and group is not None:
            os.chown(d, 0, group)
            d.chmod(0o550)  # the server's uid cannot write here, as on a read-only mount
        elif group is not None:
            os.chown(d, 0, group)
            d.chmod(0o1770)
        dirs[mount["mountPath"]] = d
    return dirs


def container_argv(objects: list[Obj], dirs: dict[str, Path], ports: dict[str, int]) -> list[str]:
    """The container's command line with mount roots, host and ports moved onto this machine."""
    c = find(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["sidemesh"]
    argv = [sys.executable, "-m", "webhook"]
    for arg in c["args"]:
        flag, eq, value = arg.partition("=")
        if flag == "--host":
            value = "127.0.0.1"
        elif flag in ports:
            value = str(ports[flag])
        for mount_path, local in dirs.items():
            if value == mount_path or value.startswith(mount_path + "/"):
                value = str(local) + value[len(mount_path) :]
                break
        argv.append(flag + eq + value if eq else arg)
    return argv


@pytest.fixture
def server(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[list[Obj], int, int, subprocess.Popen[bytes]]]:
    require_tools("kubectl")
    as_pod_user: bool = request.param
    objects = installed_objects(tmp_path / "laptop-certs")
    pod = find(objects, "Deployment")["spec"]["template"]["spec"]["securityContext"]
    if as_pod_user:
        require_root()
        require_tools("setpriv")
    group = pod["fsGroup"] if as_pod_user else None
    # pytest's own temporary directories are private to root; the pod's uid must reach its
    # volumes, so they live in a directory of their own that is removed afterwards.
    pod_root = Path(tempfile.mkdtemp(prefix="sidemesh-pod-"))
    pod_root.chmod(0o755)
    dirs = lay_out_volumes(objects, pod_root, group)
    port, metrics_port = free_port(), free_port()
    argv = container_argv(objects, dirs, {"--port": port, "--metrics-port": metrics_port})
    if as_pod_user:
        argv = [
            "setpriv", f"--reuid={pod['runAsUser']}", f"--regid={pod['runAsGroup']}",
            f"--groups={pod['fsGroup']}", "--", *argv,
        ]  # fmt: skip
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(dirs["/tmp"])}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield objects, port, metrics_port, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(pod_root)


def client(objects: list[Obj]) -> httpx.Client:
    """Trusts only the webhook's caBundle, like the API server."""
    hook = find(objects, "MutatingWebhookConfiguration")["webhooks"][0]
    ctx = ssl.create_default_context(
        cadata=base64.b64decode(hook["clientConfig"]["caBundle"]).decode()
    )
    return httpx.Client(verify=ctx, timeout=5)


def call(c: httpx.Client, method: str, port: int, path: str, **kw: Any) -> httpx.Response:
    # Connect to 127.0.0.1 but present and verify the Service's name, as the API server does.
    return c.request(
        method, f"https://127.0.0.1:{port}{path}", extensions={"sni_hostname": SERVICE_HOST}, **kw
    )


def wait_ready(
    c: httpx.Client, port: int, proc: subprocess.Popen[bytes], deadline: float = 30.0
) -> httpx.Response:
    end = time.monotonic() + deadline
    while True:
        try:
            return call(c, "GET", port, "/readyz")
        except httpx.TransportError:
            if time.monotonic() > end or proc.poll() is not None:
                raise
            time.sleep(0.2)


@pytest.mark.parametrize("server", [False, True], ids=["as-test-user", "as-pod-uid"], indirect=True)
def test_installed_objects_start_a_webhook_the_api_server_can_call(
    server: tuple[list[Obj], int, int, subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    objects, port, metrics_port, proc = server
    log = tmp_path / "server.log"
    with client(objects) as c:
        try:
            ready = wait_ready(c, port, proc)
        except httpx.TransportError as exc:
            pytest.fail(f"server never answered ({exc}); its log:\n{log.read_text()}")
        assert ready.status_code == 200, ready.text + log.read_text()
        assert call(c, "GET", port, "/healthz").status_code == 200
        review = json.loads((REPO / "webhook" / "samples" / "review.json").read_text())
        answer = call(c, "POST", port, "/mutate", json=review).json()
    assert answer["response"]["uid"] == review["request"]["uid"]
    assert answer["response"]["allowed"] is True
    patch = json.loads(base64.b64decode(answer["response"]["patch"]))
    added = json.dumps(patch)
    # The proxy image comes from the mounted mesh config, which `install --image` rewrote.
    assert f'"image": "{IMAGE}"' in added
    assert names.PROXY_CONTAINER in added
    metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
    assert metrics.status_code == 200
