"""The CNI plugin as a runtime runs it: the real reference plugins (bridge, host-local,
loopback from containernetworking-plugins) create the pod's network from a conflist, sidemesh's
plugin is chained after them by ``sidemesh cni install``, and the pod's annotations come from
the API server stand-in. All inside namespaces this test creates (tests/support/cni_lab.py).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require, require_root, require_tools
from tests.support.cni_lab import PRIMARY, CniNode, built_plugin, cni_node
from tests.support.cni_runtime import REFERENCE_DIR, CNIFailure
from tests.support.netns import Netns, NetnsLab
from tests.support.podrunner import PodRunner, sidemesh_argv
from webhook import names
from webhook.config import MeshConfig
from webhook.inject.pod import inject_pod

pytestmark = [pytest.mark.root]

SIDEMESH = sidemesh_argv()

APP: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "name": "web",
        "namespace": "demo",
        "annotations": {"traffic.sidemesh.io/exclude-outbound-ports": "5432"},
    },
    "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]},
}


def injected(*, cni: bool, name: str = "web") -> dict[str, Any]:
    pod = copy.deepcopy(APP)
    pod["metadata"]["name"] = name
    result = inject_pod(
        pod, namespace="demo", config=MeshConfig(cni=cni, discovery_address=""), bundle="PEM"
    )
    return result.pod


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_root()
    require_tools("ip", "iptables-save", "iptables-restore", "setpriv", "unshare")
    require((REFERENCE_DIR / "bridge").is_file(), "containernetworking-plugins not installed")
    return built_plugin(tmp_path_factory.mktemp("cni-plugin"))


@pytest.fixture
def node(plugin: Path) -> Iterator[CniNode]:
    with NetnsLab("smcni") as lab:
        cni = cni_node(lab)
        try:
            cni.install(plugin)
            yield cni
        finally:
            cni.close()


def nat(ns: Netns) -> str:
    return ns.run(["iptables-save", "-t", "nat"]).stdout


def rules(saved: str) -> list[str]:
    """The nat table's chains and rules, without iptables-save's comments and counters."""
    return [line for line in saved.splitlines() if line.startswith(("-A ", ":SIDEMESH"))]


def test_standin_injected_pod_gets_init_traffics_rules_and_del_removes_them(
    node: CniNode,
) -> None:
    pod = node.add_pod(injected(cni=True), "web", "demo", "web")
    assert pod.ip in str(node.subnet) or pod.ip.startswith("10.240.0.")

    # the very rules `sidemesh init-traffic` installs with the same arguments
    args = json.loads(injected(cni=True)["metadata"]["annotations"][names.CNI_CAPTURE])
    reference = node.lab.namespace("reference")
    reference.run([*SIDEMESH, "init-traffic", *args, "--ipv6", "off"])
    assert rules(nat(pod.ns)) == rules(nat(reference))
    assert "--dport 5432 -j RETURN" in nat(pod.ns)

    node.runtime.check(pod.ns, "demo", "web")  # CHECK passes while the rules are in place
    pod.ns.run([*SIDEMESH, "init-traffic", "--cleanup", "--ipv6", "off"])
    with pytest.raises(CNIFailure) as info:
        node.runtime.check(pod.ns, "demo", "web")
    assert info.value.plugin == "sidemesh-cni"
    assert "traffic capture of pod demo/web is not in place" in info.value.error["msg"]

    pod.ns.run([*SIDEMESH, "init-traffic", *args, "--ipv6", "off"])
    node.runtime.delete(pod.ns, "demo", "web")
    assert rules(nat(pod.ns)) == [], "DEL leaves no rule and no chain behind"
    assert "eth0" not in pod.ns.ip("-o", "link"), "and the bridge plugin took the veth"
    leases = [p.name for p in node.ipam_dir.rglob("*") if p.name == pod.ip]
    assert leases == [], "and host-local released the address"


@pytest.mark.parametrize(
    "pod",
    [
        pytest.param(copy.deepcopy(APP), id="not-injected"),
        pytest.param(injected(cni=False), id="classic-mode"),
    ],
)
def test_standin_other_pods_are_passed_through_without_rules(
    node: CniNode, pod: dict[str, Any]
) -> None:
    sandbox = node.add_pod(pod, "other", "demo", "web")
    assert rules(nat(sandbox.ns)) == []
    # the chain's result is the bridge's, untouched
    calls = [c[0] for c in node.runtime.calls if c[1] == "ADD"]
    assert calls == ["loopback", "bridge", "sidemesh-cni"]
    result = node.runtime.results[sandbox.ns.name][1]
    assert result is not None and result["ips"][0]["address"].startswith(sandbox.ip + "/")
    assert result["interfaces"], result


def test_standin_unreachable_api_server_fails_the_sandbox(node: CniNode) -> None:
    node.standin.pods[("demo", "web")] = injected(cni=True)
    node.standin.stop()
    ns = node.lab.namespace("web")
    with pytest.raises(CNIFailure) as info:
        node.runtime.add(ns, "demo", "web")
    assert info.value.plugin == "sidemesh-cni"
    assert info.value.error["code"] == 11  # "try again later": the kubelet retries
    assert "cannot reach the API server to look up pod demo/web" in info.value.error["msg"]
    # the runtime's clean-up DEL ran through the chain: no rules, no interface left
    assert rules(nat(ns)) == []
    assert "eth0" not in ns.ip("-o", "link")
    # the cluster's own pods still get their network: no lookup for kube-system
    system = node.lab.namespace("dns")
    result = node.runtime.add(system, "kube-system", "coredns-0")
    assert result["ips"], result


def test_standin_stopped_agent_fails_the_sandbox(node: CniNode, plugin: Path) -> None:
    """The agent died while sidemesh is chained (its socket is left, nobody answers): ADD fails
    with a clear error, so the meshed pod does not start uncaptured; kube-system still works."""
    node.standin.pods[("demo", "web")] = injected(cni=True)
    node.stop_agent(crash=True)
    assert (node.conf_dir / "sidemesh-cni.sock").exists(), "a crash leaves the socket"
    ns = node.lab.namespace("web")
    with pytest.raises(CNIFailure) as info:
        node.runtime.add(ns, "demo", "web")
    assert info.value.plugin == "sidemesh-cni"
    assert info.value.error["code"] == 11
    assert "cannot reach the node agent" in info.value.error["msg"]
    assert "demo/web" in info.value.error["msg"]
    assert rules(nat(ns)) == [] and "eth0" not in ns.ip("-o", "link")
    system = node.lab.namespace("dns")
    assert node.runtime.add(system, "kube-system", "coredns-0")["ips"]

    # the DaemonSet restarts the agent: the same pod now gets its sandbox and its rules
    node.install(plugin)
    pod = node.add_pod(None, "web2", "demo", "web")
    assert ":SIDEMESH_OUTPUT" in nat(pod.ns)


def test_standin_unknown_pod_fails_the_sandbox(node: CniNode) -> None:
    with pytest.raises(CNIFailure) as info:
        node.add_pod(None, "ghost", "demo", "ghost")
    assert "404" in info.value.error["msg"] and "demo/ghost" in info.value.error["msg"]


def test_standin_forged_capture_annotation_fails_the_sandbox(node: CniNode) -> None:
    pod = injected(cni=True)
    pod["metadata"]["annotations"][names.CNI_CAPTURE] = '["--proxy-uid", "0"]'
    with pytest.raises(CNIFailure) as info:
        node.add_pod(pod, "forged", "demo", "web")
    assert "--proxy-uid 0: must be a non-root id" in info.value.error["msg"]


def test_version_and_bad_requests(node: CniNode) -> None:
    plugin = str(node.bin_dir / "sidemesh-cni")
    done = node.ns.run([plugin], env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/usr/sbin"})
    assert json.loads(done.stdout) == {
        "cniVersion": "1.0.0",
        "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"],
    }
    env = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "x",
        "CNI_NETNS": "/run/netns/none",
        "CNI_IFNAME": "eth0",
        "PATH": "/usr/bin:/usr/sbin",
    }
    conf = {"cniVersion": "1.0.0", "name": "n", "type": "sidemesh-cni", "agent_socket": "/k"}
    done = node.ns.run([plugin], env=env, input=json.dumps(conf), check=False)
    assert done.returncode == 1
    assert json.loads(done.stdout)["msg"] == (
        "sidemesh must be chained after the primary plugin (no prevResult on stdin)"
    )


def test_installer_chained_sidemesh_after_the_primary_plugin(node: CniNode) -> None:
    chain = json.loads((node.conf_dir / PRIMARY).read_text())["plugins"]
    assert [p["type"] for p in chain] == ["bridge", "sidemesh-cni"]
    assert chain[1]["agent_socket"] == f"{node.conf_dir}/sidemesh-cni.sock"
    assert not (node.conf_dir / "sidemesh-cni.kubeconfig").exists(), "no token on the node"
    assert (node.conf_dir / "sidemesh-cni.sock").stat().st_mode & 0o777 == 0o600


def test_validate_passes_in_a_captured_pod_and_fails_without_the_plugin(
    node: CniNode, plugin: Path
) -> None:
    pod = injected(cni=True)
    args = pod["spec"]["initContainers"][0]["args"]
    uid = names.VALIDATE_UID
    captured = node.add_pod(pod, "web", "demo", "web")
    ok = captured.ns.run([*SIDEMESH, "cni", "validate", *args], uid=uid, gid=uid)
    assert "traffic capture in place" in ok.stderr

    # the node agent is not there yet: the runtime runs the primary plugin alone
    node.standin.pods[("demo", "early")] = injected(cni=True, name="early")
    node.stop_agent()  # SIGTERM: the agent takes sidemesh out of the chain
    early = node.add_pod(None, "early", "demo", "early")
    bad = early.ns.run([*SIDEMESH, "cni", "validate", *args], uid=uid, gid=uid, check=False)
    assert bad.returncode == 1
    assert "traffic capture is NOT in place" in bad.stderr
    assert "sidemesh-cni DaemonSet" in bad.stderr


def test_race_pod_before_node_agent_never_runs_its_app(node: CniNode) -> None:
    """The pod's sandbox was made before sidemesh was in the chain: the validate container
    fails, so the kubelet never starts the proxy or the app; the pod runs nothing uncaptured."""
    node.stop_agent()
    pod = injected(cni=True, name="early")
    net = node.add_pod(None, "early", "demo", "early")
    runner = PodRunner(
        lab=node.lab,
        node=node.node,
        pod_net=net,
        pod=pod,
        app_commands={"app": ["/bin/sleep", "60"]},
        sidemesh=SIDEMESH,
        token_for=lambda *_: "unused",
    )
    with pytest.raises(RuntimeError) as info:
        runner.start()
    assert names.VALIDATE_CONTAINER not in runner.procs
    assert "traffic capture is NOT in place" in str(info.value)
    assert runner.procs == {}, "neither the proxy nor the app was started"


def test_standin_dual_stack_pod_gets_ip6tables_rules_too(plugin: Path) -> None:
    """The primary plugin gave the pod an IPv6 address too (prevResult): the plugin programs
    ip6tables as well and puts the proxy's IPv6 passthrough source on lo; DEL removes both."""
    with NetnsLab("smcni6") as lab:
        node = cni_node(lab, subnet6="fd00:5e:cafe::/64")
        try:
            node.install(plugin)
            pod = node.add_pod(injected(cni=True), "web", "demo", "web")
            result = node.runtime.results[pod.ns.name][1]
            assert result is not None and len(result["ips"]) == 2, result
            v6 = pod.ns.run(["ip6tables-save", "-t", "nat"]).stdout
            assert ":SIDEMESH_OUTPUT" in v6 and "-A OUTPUT -p tcp -j SIDEMESH_OUTPUT" in v6
            assert "::6/128" in pod.ns.ip("-6", "addr", "show", "dev", "lo")
            node.runtime.check(pod.ns, "demo", "web")
            node.runtime.delete(pod.ns, "demo", "web")
            assert "SIDEMESH" not in pod.ns.run(["ip6tables-save", "-t", "nat"]).stdout
            assert "::6/128" not in pod.ns.ip("-6", "addr", "show", "dev", "lo")
            assert rules(nat(pod.ns)) == []
        finally:
            node.close()


def test_standin_validate_checks_an_ipv6_only_pod_over_ipv6(plugin: Path) -> None:
    with NetnsLab("smcniv6") as lab:
        node = cni_node(lab)
        try:
            primary = json.loads((node.conf_dir / PRIMARY).read_text())
            ipam = primary["plugins"][0]["ipam"]
            ipam["ranges"], ipam["routes"] = [[{"subnet": "fd00:5e:beef::/64"}]], [{"dst": "::/0"}]
            (node.conf_dir / PRIMARY).write_text(json.dumps(primary))
            pod = injected(cni=True)
            args = pod["spec"]["initContainers"][0]["args"]
            uid = names.VALIDATE_UID
            without = node.add_pod(pod, "bare", "demo", "web")  # sidemesh not chained yet
            bad = without.ns.run(
                [*SIDEMESH, "cni", "validate", *args], uid=uid, gid=uid, check=False
            )
            assert bad.returncode == 1 and "[2001:db8::1]:15999" in bad.stderr, bad.stderr

            node.install(plugin)
            captured = node.add_pod(pod, "web", "demo", "web")
            assert ":" in captured.ip, captured
            ok = captured.ns.run([*SIDEMESH, "cni", "validate", *args], uid=uid, gid=uid)
            assert "a connection to [2001:db8::1]:15999 was redirected" in ok.stderr
        finally:
            node.close()
