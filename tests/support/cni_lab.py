"""A node of a CNI-mode cluster in the netns lab: the runtime's CNI half played by the real
reference plugins (:mod:`tests.support.cni_runtime`), sidemesh's node agent running the way its
DaemonSet runs it (``sidemesh cni install``: it chains the plugin in and answers the plugin's
pod look-ups on its Unix socket), and the API server's part played by
:mod:`tests.support.apiserver_standin`, listening on 127.0.0.1 *inside* the node namespace,
where the agent runs: ADD goes plugin → agent socket → stand-in::

    node netns: cni0 10.240.0.1/24 (made by the bridge plugin), the stand-in on 127.0.0.1
      ├── pod netns: eth0 10.240.0.2/24 (veth made by bridge, address by host-local)
      └── …

No uplink anywhere: the bridge's only ports are the pods' veths.
"""

from __future__ import annotations

import ipaddress
import json
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.apiserver_standin import APIServerStandin
from tests.support.cni_runtime import Runtime, bridge_conflist, reference_plugins
from tests.support.jwks_issuer import Issuer
from tests.support.netns import Netns, NetnsLab, Node, Pod, Proc
from tests.support.podrunner import sidemesh_argv

__all__ = ["PRIMARY", "CniNode", "built_plugin", "cni_node"]

PRIMARY = "10-lab-pods.conflist"
_BUILT: dict[str, Path] = {}
_LOCK = threading.Lock()


def built_plugin(directory: Path) -> Path:
    """The plugin file (``sidemesh cni build-plugin``), built once per test session."""
    with _LOCK:
        if "plugin" not in _BUILT:
            target = directory / "sidemesh-cni.d"
            subprocess.run(
                [*sidemesh_argv(), "cni", "build-plugin", "-o", str(target)],
                check=True,
                capture_output=True,
            )
            _BUILT["plugin"] = target
        return _BUILT["plugin"]


@dataclass
class CniNode:
    lab: NetnsLab
    ns: Netns
    runtime: Runtime
    standin: APIServerStandin
    subnet: ipaddress.IPv4Network
    bin_dir: Path
    conf_dir: Path
    ipam_dir: Path
    token_file: Path
    agent: Proc | None = None

    @property
    def node(self) -> Node:
        """The node as :class:`tests.support.podrunner.PodRunner` wants it (kubelet probes
        come from the node namespace, over the bridge)."""
        return Node(self.lab, self.ns, self.subnet, None)

    def agent_argv(self, plugin: Path, *extra: str) -> list[str]:
        return [
            *sidemesh_argv(),
            "cni",
            "install",
            "--bin-dir",
            str(self.bin_dir),
            "--net-dir",
            str(self.conf_dir),
            "--node-net-dir",
            str(self.conf_dir),
            "--api-server",
            self.standin.url,
            "--token-file",
            str(self.token_file),
            "--ca-file",
            str(self.standin.ca_file),
            "--plugin-dir",
            str(plugin),
            *extra,
        ]

    def install(self, plugin: Path) -> str:
        """Start the node agent in the node namespace (as its DaemonSet pod runs) and wait
        until it is ready (serving look-ups, chained); its output so far."""
        if self.agent is not None and self.agent.running():
            return self.agent.output()
        ready = self.lab.tmpdir("agent") / "ready"
        argv = self.agent_argv(plugin, "--interval", "0.2", "--ready-file", str(ready))
        self.agent = self.ns.spawn(argv)
        # Only a hung agent should reach this: it loads the API client before it chains sidemesh
        # in, which on a loaded two-core machine takes many times its quiet start-up.
        deadline = time.monotonic() + 120
        while not ready.exists():
            if not self.agent.running() or time.monotonic() > deadline:
                raise RuntimeError(f"the node agent did not get ready:\n{self.agent.output()}")
            time.sleep(0.05)
        return self.agent.output()

    def stop_agent(self, *, crash: bool = False) -> None:
        """SIGTERM: the agent uninstalls (out of the chain) and exits; ``crash``: SIGKILL, so
        the chain still names sidemesh but nobody answers on the socket."""
        if self.agent is None:
            return
        if crash:
            self.agent.signal(signal.SIGKILL)
        self.agent.stop(timeout=15)
        self.agent = None

    def close(self) -> None:
        self.stop_agent()
        self.standin.stop()

    def add_pod(self, pod: dict[str, Any] | None, label: str, namespace: str, name: str) -> Pod:
        """Publish ``pod`` on the stand-in (None: no such pod), create its sandbox namespace
        and network it through the chain; the :class:`Pod` with the address it got."""
        if pod is not None:
            self.standin.pods[(namespace, name)] = pod
        ns = self.lab.namespace(label)
        result = self.runtime.add(ns, namespace, name)
        return Pod(ns=ns, ip=Runtime.address(result), ip6=None)


def cni_node(
    lab: NetnsLab, *, subnet: str = "10.240.0.0/24", subnet6: str | None = None
) -> CniNode:
    """The node namespace, the bridge network as the primary config (dual stack with
    ``subnet6``), the stand-in."""
    ns = lab.namespace("node")
    bin_dir, conf_dir = lab.tmpdir("cnibin"), lab.tmpdir("netd")
    ipam_dir = lab.tmpdir("ipam")
    reference_plugins(bin_dir)
    (conf_dir / PRIMARY).write_text(
        json.dumps(bridge_conflist(subnet, ipam_dir, subnet6=subnet6), indent=2)
    )
    standin = APIServerStandin(lab.tmpdir("standin"), Issuer.create(), bind=ns.in_namespace)
    standin.start()
    token_file = lab.tmpdir("sa") / "token"
    token_file.write_text(standin.caller_token)
    return CniNode(
        lab=lab,
        ns=ns,
        runtime=Runtime(ns, conf_dir, bin_dir),
        standin=standin,
        subnet=ipaddress.IPv4Network(subnet),
        bin_dir=bin_dir,
        conf_dir=conf_dir,
        ipam_dir=ipam_dir,
        token_file=token_file,
    )
