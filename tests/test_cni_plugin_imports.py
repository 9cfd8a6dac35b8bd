"""The CNI plugin runs once per pod sandbox on the node: its ADD path imports the standard
library and sidemesh's own modules only — no API client, no pydantic, no cryptography. Each
case runs the plugin in a fresh interpreter of this environment (where those packages *are*
installed, so an accidental import would happen) with ``python -X importtime`` and reads the
interpreter's own list of what it imported. The pod look-up is answered by the node agent's
real socket server (:mod:`webhook.cni.agent`), serving from this test process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO
from webhook import names
from webhook.cni.agent import LookupServer, serve
from webhook.config import MeshConfig
from webhook.inject.pod import inject_pod

POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "web", "namespace": "demo"},
    "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]},
}
PLUGIN = "from webhook.cni.plugin import main; raise SystemExit(main())"


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[LookupServer]:
    pod = inject_pod(POD, namespace="demo", config=MeshConfig(cni=True), bundle="PEM").pod
    annotations = pod["metadata"]["annotations"]
    assert names.CNI_CAPTURE in annotations
    server = serve(tmp_path / "agent.sock", lambda ns, name: annotations)
    yield server
    server.close()


def run_plugin(command: str, socket: Path, netns: str) -> tuple[dict[str, object], set[str]]:
    conf = {
        "cniVersion": "1.0.0",
        "name": "k8s",
        "type": "sidemesh-cni",
        "agent_socket": str(socket),
        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.240.0.2/24"}]},
    }
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c1",
        "CNI_NETNS": netns,
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web",
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    }
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", PLUGIN],
        cwd=REPO,
        env=env,
        input=json.dumps(conf),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    modules = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "package":
                modules.add(name)
    return (json.loads(proc.stdout) if proc.stdout.strip() else {}), modules


def _startup() -> set[str]:
    """What this environment's interpreter imports before any code runs (site hooks)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "pass"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if "|" in line}


def foreign(modules: set[str]) -> list[str]:
    """Imported modules that are neither the standard library's nor sidemesh's (nor the
    interpreter's own start-up, which the node's isolated ``-S`` run does not have)."""
    # ``org.python.core``: the standard library's copy module probes for Jython (and fails)
    allowed = set(sys.stdlib_module_names) | {"webhook", "org"}
    startup = _startup()
    return sorted(m for m in modules - startup if m.split(".")[0] not in allowed)


def test_add_of_a_meshed_pod_imports_only_the_standard_library(
    agent: LookupServer, tmp_path: Path
) -> None:
    # the agent answered (a CNI-mode pod); the plugin then tried to enter the pod's namespace,
    # which does not exist here: by then it has imported everything ADD needs
    result, modules = run_plugin("ADD", agent.path, str(tmp_path / "no-such-netns"))
    assert "cannot open CNI_NETNS" in str(result["msg"]), result
    assert {"webhook.cni.plugin", "webhook.cni.agentclient", "webhook.cli.traffic"} <= modules
    assert "webhook.dataplane.netns" in modules
    assert not foreign(modules), f"the plugin imported {foreign(modules)}"


def test_del_imports_only_the_standard_library(agent: LookupServer, tmp_path: Path) -> None:
    result, modules = run_plugin("DEL", agent.path, str(tmp_path / "gone"))
    assert result == {}, "DEL of a namespace that is gone succeeds silently"
    assert "webhook.cni.plugin" in modules
    assert not foreign(modules), f"the plugin imported {foreign(modules)}"


def test_the_check_would_notice(tmp_path: Path) -> None:
    """The same reading sees the API client when the agent's look-up module is imported."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import webhook.cni.podinfo, kubernetes"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    modules = {
        line.rsplit("|", 1)[1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "kubernetes" in foreign(modules)
