"""The container runtime's CNI half, for the netns lab: what containerd or CRI-O do through
libcni when the kubelet asks for a pod sandbox — no more, and with the real plugins.

* the network config is the first file of the config directory in lexical order (a
  ``.conflist``); each plugin of its chain is executed from ``CNI_PATH`` with ``CNI_COMMAND``,
  ``CNI_CONTAINERID``, ``CNI_NETNS``, ``CNI_IFNAME`` and ``CNI_ARGS`` (the kubelet's
  ``K8S_POD_NAMESPACE``/``K8S_POD_NAME``) in its environment and its own entry on stdin, with
  ``cniVersion`` and ``name`` copied in from the list and, after the first, the previous
  plugin's result as ``prevResult``;
* the loopback plugin is run on its own network for ``lo`` first (containerd does the same);
* ADD's result is cached; DEL runs the chain in reverse with that result as ``prevResult``,
  CHECK in order; a failed ADD is followed by a DEL, as a runtime cleans up a failed sandbox.

Every plugin runs in the lab's "node" namespace (a real runtime runs them in the machine's),
so the bridge the reference ``bridge`` plugin creates, its addresses and its sysctls all live
in a namespace the test created. :func:`reference_plugins` links Debian's binaries
(``containernetworking-plugins``) into a lab directory that serves as ``CNI_PATH``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.netns import Netns

__all__ = ["REFERENCE_DIR", "CNIFailure", "Runtime", "bridge_conflist", "reference_plugins"]

REFERENCE_DIR = Path("/usr/lib/cni")
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class CNIFailure(RuntimeError):
    """A plugin answered with a CNI error (its JSON: ``code``, ``msg``, ``details``)."""

    def __init__(self, plugin: str, command: str, error: dict[str, Any], stderr: str) -> None:
        self.plugin, self.command, self.error, self.stderr = plugin, command, error, stderr
        super().__init__(f"{plugin} {command} failed: {error} (stderr: {stderr.strip()})")


def reference_plugins(bin_dir: Path, *names: str) -> None:
    """Link the reference plugins ``names`` (default: bridge, host-local, loopback) in."""
    for name in names or ("bridge", "host-local", "loopback"):
        source = REFERENCE_DIR / name
        if not source.is_file():
            raise FileNotFoundError(f"{source}: install containernetworking-plugins")
        (bin_dir / name).symlink_to(source)


def bridge_conflist(
    subnet: str, ipam_dir: Path, *, subnet6: str | None = None, name: str = "lab-pods"
) -> dict[str, Any]:
    """A primary network as a kubeadm-style cluster has it: a bridge that is the pods' gateway,
    host-local addresses from ``subnet`` (and ``subnet6``: dual stack; state in ``ipam_dir``),
    default routes. No masquerade: the node namespace has no uplink, nothing is rewritten."""
    ranges: list[list[dict[str, str]]] = [[{"subnet": subnet}]]
    routes = [{"dst": "0.0.0.0/0"}]
    if subnet6 is not None:
        ranges.append([{"subnet": subnet6}])
        routes.append({"dst": "::/0"})
    return {
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                "ipMasq": False,
                "ipam": {
                    "type": "host-local",
                    "ranges": ranges,
                    "routes": routes,
                    "dataDir": str(ipam_dir),
                },
            }
        ],
    }


@dataclass
class Runtime:
    node: Netns
    conf_dir: Path
    bin_dir: Path
    #: container id → (network config used, cached ADD result), like libcni's result cache
    results: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = field(default_factory=dict)
    #: every plugin execution: (plugin type, command, container id)
    calls: list[tuple[str, str, str]] = field(default_factory=list)

    def network(self) -> dict[str, Any]:
        files = sorted(
            p for p in self.conf_dir.iterdir() if p.suffix in (".conflist", ".conf", ".json")
        )
        if not files:
            raise FileNotFoundError(f"no network config in {self.conf_dir}")
        data: dict[str, Any] = json.loads(files[0].read_text())
        return data

    def _exec(
        self,
        conf: dict[str, Any],
        command: str,
        pod_ns: Netns,
        ifname: str,
        pod: tuple[str, str],
    ) -> dict[str, Any] | None:
        plugin = str(conf["type"])
        container_id = pod_ns.name
        self.calls.append((plugin, command, container_id))
        env = {
            "PATH": _PATH,
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": f"/run/netns/{pod_ns.name}",
            "CNI_IFNAME": ifname,
            "CNI_ARGS": (
                f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod[0]};K8S_POD_NAME={pod[1]};"
                f"K8S_POD_INFRA_CONTAINER_ID={container_id}"
            ),
            "CNI_PATH": str(self.bin_dir),
        }
        done = self.node.run(
            [str(self.bin_dir / plugin)], env=env, input=json.dumps(conf), check=False
        )
        if done.returncode != 0:
            try:
                error = json.loads(done.stdout)
            except ValueError:
                error = {"code": -1, "msg": done.stdout.strip()}
            raise CNIFailure(plugin, command, error, done.stderr)
        out = done.stdout.strip()
        return json.loads(out) if out else None

    def _entries(self, network: dict[str, Any]) -> list[dict[str, Any]]:
        top = {"cniVersion": network["cniVersion"], "name": network["name"]}
        return [{**plugin, **top} for plugin in network["plugins"]]

    def add(self, pod_ns: Netns, namespace: str, name: str) -> dict[str, Any]:
        """Network a new sandbox; raises :class:`CNIFailure` (after cleaning up) on failure."""
        pod = (namespace, name)
        loopback = {"cniVersion": "1.0.0", "name": "cni-loopback", "type": "loopback"}
        self._exec(loopback, "ADD", pod_ns, "lo", pod)
        network = self.network()
        prev: dict[str, Any] | None = None
        try:
            for conf in self._entries(network):
                if prev is not None:
                    conf["prevResult"] = prev
                prev = self._exec(conf, "ADD", pod_ns, "eth0", pod)
        except CNIFailure:
            self.results[pod_ns.name] = (network, None)
            self.delete(pod_ns, namespace, name)
            raise
        assert prev is not None
        self.results[pod_ns.name] = (network, prev)
        return prev

    def delete(self, pod_ns: Netns, namespace: str, name: str) -> None:
        network, prev = self.results.pop(pod_ns.name, (self.network(), None))
        for conf in reversed(self._entries(network)):
            if prev is not None:
                conf["prevResult"] = prev
            self._exec(conf, "DEL", pod_ns, "eth0", (namespace, name))

    def check(self, pod_ns: Netns, namespace: str, name: str) -> None:
        network, prev = self.results[pod_ns.name]
        for conf in self._entries(network):
            conf["prevResult"] = prev
            self._exec(conf, "CHECK", pod_ns, "eth0", (namespace, name))

    @staticmethod
    def address(result: dict[str, Any]) -> str:
        """The pod's first address (IPv4 first, as host-local hands them out) from an ADD result."""
        return str(result["ips"][0]["address"]).split("/")[0]
