"""The node agent (``sidemesh cni install``) on a node's CNI directories — here temporary
ones: it copies the plugin, chains sidemesh after the primary plugin, serves the plugin's pod
look-ups on a Unix socket, keeps it chained when the primary plugin's agent rewrites the file,
and takes everything away again on SIGTERM. Then the installed plugin answers a runtime's
VERSION with the node's Python."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.cni_lab import built_plugin
from tests.support.podrunner import sidemesh_argv
from webhook.cni.agentclient import read_annotations
from webhook.cni.bundle import PAYLOAD
from webhook.cni.spec import CNIError

SIDEMESH = sidemesh_argv()
PRIMARY = {
    "cniVersion": "1.0.0",
    "name": "k8s-pod-network",
    "plugins": [{"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}}],
}


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built_plugin(tmp_path_factory.mktemp("cni-plugin"))


class Node:
    def __init__(self, root: Path, payload: Path) -> None:
        self.bin, self.net, self.sa = root / "bin", root / "net.d", root / "sa"
        for d in (self.bin, self.net, self.sa):
            d.mkdir()
        (self.sa / "token").write_text("token-1")
        (self.sa / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nx\n")
        self.payload = payload
        self.ready = root / "ready"

    def argv(self, *extra: str) -> list[str]:
        return [
            *SIDEMESH,
            "cni",
            "install",
            *("--bin-dir", str(self.bin), "--net-dir", str(self.net)),
            *("--node-net-dir", "/etc/cni/net.d", "--api-server", "https://10.96.0.1:443"),
            *("--token-file", str(self.sa / "token"), "--ca-file", str(self.sa / "ca.crt")),
            *("--plugin-dir", str(self.payload)),
            *extra,
        ]

    def once(self) -> str:
        return subprocess.run(
            self.argv("--once"), check=True, capture_output=True, text=True
        ).stderr

    def chain(self, name: str = "10-bridge.conflist") -> list[str]:
        return [p["type"] for p in json.loads((self.net / name).read_text())["plugins"]]


@pytest.fixture
def node(tmp_path: Path, payload: Path) -> Node:
    return Node(tmp_path, payload)


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 120) -> None:
    # Generous: only a hung agent should run into it. Started under a load of a dozen runnable
    # processes on two cores, an agent takes many times its usual start-up to get ready.
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def test_one_pass_installs_everything_and_a_second_changes_nothing(node: Node) -> None:
    (node.net / "10-bridge.conflist").write_text(json.dumps(PRIMARY))
    report = node.once()
    assert "chained into 10-bridge.conflist" in report
    assert node.chain() == ["bridge", "sidemesh-cni"]
    entry = json.loads((node.net / "10-bridge.conflist").read_text())["plugins"][1]
    assert entry["agent_socket"] == "/etc/cni/net.d/sidemesh-cni.sock"
    assert entry["exclude_namespaces"] == [
        "kube-system",
        "kube-public",
        "kube-node-lease",
        "sidemesh-system",
    ]

    # the plugin holds no credential: the node keeps no token file
    assert sorted(p.name for p in node.net.iterdir()) == ["10-bridge.conflist"]
    launcher = node.bin / "sidemesh-cni"
    assert os.access(launcher, os.X_OK) and (node.bin / PAYLOAD / "webhook").is_dir()

    assert "nothing to change" in node.once()


def test_agent_uses_its_own_service_account_and_follows_rotation(node: Node) -> None:
    from webhook.cni.install import Settings, credentials

    settings = Settings(
        bin_dir=node.bin,
        net_dir=node.net,
        api_server="https://10.96.0.1:443",
        token_file=node.sa / "token",
        ca_file=node.sa / "ca.crt",
    )
    assert credentials(settings) == ("https://10.96.0.1:443", "token-1", str(node.sa / "ca.crt"))
    # the kubelet rotates the token: the next look-up uses the new one
    (node.sa / "token").write_text("token-2")
    assert credentials(settings)[1] == "token-2"


def test_a_single_plugin_conf_is_converted(node: Node) -> None:
    single = {"cniVersion": "0.4.0", "name": "net", "type": "bridge"}
    (node.net / "10-bridge.conf").write_text(json.dumps(single))
    assert "converted from 10-bridge.conf" in node.once()
    assert not (node.net / "10-bridge.conf").exists()
    assert node.chain() == ["bridge", "sidemesh-cni"]


def test_installed_plugin_answers_version_with_the_nodes_python(node: Node) -> None:
    (node.net / "10-bridge.conflist").write_text(json.dumps(PRIMARY))
    node.once()
    launcher = str(node.bin / "sidemesh-cni")
    env = {"CNI_COMMAND": "VERSION", "PATH": "/usr/local/bin:/usr/bin:/bin"}
    done = subprocess.run([launcher], env=env, capture_output=True, text=True, check=True)
    assert json.loads(done.stdout)["supportedVersions"] == ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]
    # a node without that Python: a CNI error the runtime can show, not a shell message
    done = subprocess.run(
        ["/bin/sh", launcher], env={"PATH": "/nonexistent"}, capture_output=True, text=True
    )
    assert done.returncode == 1
    assert "is not installed on this node" in json.loads(done.stdout)["msg"]


def test_watch_keeps_sidemesh_chained_and_removes_it_on_sigterm(node: Node) -> None:
    original = json.dumps(PRIMARY, indent=1)
    agent = subprocess.Popen(
        node.argv("--interval", "0.1", "--ready-file", str(node.ready)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # a new node: no primary config yet, so not ready; then the primary plugin arrives
        time.sleep(0.3)
        assert not node.ready.exists()
        (node.net / "10-bridge.conflist").write_text(original)
        wait_for("ready", node.ready.exists)
        assert node.chain() == ["bridge", "sidemesh-cni"]

        # the primary plugin's agent rewrites its file: sidemesh is chained in again
        (node.net / "10-bridge.conflist").write_text(original)
        wait_for("re-chained", lambda: node.chain() == ["bridge", "sidemesh-cni"])

        # the look-up socket: root only (the runtime)
        sock = node.net / "sidemesh-cni.sock"
        assert sock.is_socket() and sock.stat().st_mode & 0o777 == 0o600

        # an older version's kubeconfig (a token on the node) is removed
        (node.net / "sidemesh-cni.kubeconfig").write_text("{}")
        wait_for("old kubeconfig", lambda: not (node.net / "sidemesh-cni.kubeconfig").exists())
    finally:
        agent.send_signal(signal.SIGTERM)
        _, err = agent.communicate(timeout=30)
    assert agent.returncode == 0, err
    assert json.loads((node.net / "10-bridge.conflist").read_text()) == PRIMARY
    assert sorted(p.name for p in node.net.iterdir()) == ["10-bridge.conflist"]
    assert list(node.bin.iterdir()) == []
    assert not node.ready.exists()
    assert "removed from 10-bridge.conflist" in err


def test_agent_loads_the_api_client_before_it_chains_sidemesh_in(node: Node) -> None:
    """The first sandbox after the agent starts must not wait for the official client's Python
    imports (on a busy node they outlast the plugin's timeout): by the time sidemesh is in the
    chain, a look-up imports nothing of the client. Read from the interpreter's own import log
    (``-X importtime``); the look-up goes to a closed port, so it fails fast and clearly."""
    (node.net / "10-bridge.conflist").write_text(json.dumps(PRIMARY))
    argv = node.argv("--interval", "0.1", "--api-server", "https://127.0.0.1:1")
    log = node.sa.parent / "agent.log"  # a file: the import log alone can fill a pipe's buffer
    with log.open("w") as out:
        agent = subprocess.Popen(
            [argv[0], "-X", "importtime", *argv[1:]], stdout=subprocess.DEVNULL, stderr=out
        )
    try:
        wait_for("chained", lambda: node.chain() == ["bridge", "sidemesh-cni"])
        with pytest.raises(CNIError) as info:
            read_annotations(str(node.net / "sidemesh-cni.sock"), "demo", "web", timeout=30)
        assert "cannot reach the API server to look up pod demo/web" in info.value.msg
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)
    err = log.read_text()
    assert agent.returncode == 0, err
    before, chained, after = err.partition("chained into 10-bridge.conflist")
    assert chained, err
    assert "kubernetes.client" in before, "the client was loaded at start-up"
    late = [line for line in after.splitlines() if "| kubernetes" in line]
    assert late == [], "the look-up imported part of the client"


def test_uninstall_command_is_clean_when_there_is_nothing(node: Node) -> None:
    (node.net / "10-bridge.conflist").write_text(json.dumps(PRIMARY))
    argv = [*SIDEMESH, "cni", "uninstall", "--bin-dir", str(node.bin), "--net-dir", str(node.net)]
    done = subprocess.run(argv, check=True, capture_output=True, text=True)
    assert "nothing to remove" in done.stderr
    node.once()
    done = subprocess.run(argv, check=True, capture_output=True, text=True)
    assert json.loads((node.net / "10-bridge.conflist").read_text()) == PRIMARY
    assert list(node.bin.iterdir()) == []


def test_plugin_command_runs_the_plugin_from_this_installation() -> None:
    env = {"CNI_COMMAND": "VERSION", "PATH": os.environ.get("PATH", "/usr/bin")}
    done = subprocess.run(
        [*SIDEMESH, "cni", "plugin"], env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(done.stdout)["cniVersion"] == "1.0.0"
    env["CNI_COMMAND"] = "ADD"
    done = subprocess.run(
        [*SIDEMESH, "cni", "plugin"], env=env, input="", capture_output=True, text=True
    )
    assert done.returncode == 1
    assert json.loads(done.stdout)["msg"] == "CNI_CONTAINERID is not set"
