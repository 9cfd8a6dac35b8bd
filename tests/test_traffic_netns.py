"""`sidemesh init-traffic` with real iptables, in network namespaces this test creates (root).

Topology (tests/netns.py): a node bridge with three pods. ``app`` gets the capture rules and
runs a listener on the proxy's ports (15006 inbound, 15001 outbound) and on app ports; ``peer``
and ``other`` run plain listeners. Every listener answers with the port that accepted the
connection, its local address and SO_ORIGINAL_DST, so each test sees where a connection landed
and where it was meant to go. Clients run as the uids that matter (an app uid, the proxy's
1337) through ``setpriv``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import TESTDATA, require_root, require_tools
from tests.support.netns import Netns, NetnsLab, Node, Pod, listener_argv, probe
from webhook.dataplane.netns import in_initial_network_namespace

pytestmark = pytest.mark.root

APP_UID = 1000
PROXY_UID = 1337
#: The app pod's listener: proxy ports, two app ports (9000 gets excluded), the health port.
APP_PORTS = [15006, 15001, 8080, 9000, 15021]


def sidemesh(ns: Netns, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return ns.run([sys.executable, "-m", "webhook", "init-traffic", *args], check=check)


def nat_rules(ns: Netns, tool: str = "iptables-save") -> list[str]:
    out = ns.run([tool, "-t", "nat"]).stdout
    return [line for line in out.splitlines() if line.startswith("-A ")]


@dataclass
class Pods:
    node: Node
    app: Pod
    peer: Pod
    other: Pod

    def from_app(self, host: str, port: int, **kw: Any) -> dict[str, Any]:
        kw.setdefault("uid", APP_UID)
        return probe(self.app.ns, host, port, **kw)


def landed(reply: dict[str, Any], pod: Pod, port: int) -> bool:
    """The connection was accepted by ``pod``'s listener on ``port``."""
    return bool(reply.get("ok")) and (reply["name"], reply["port"]) == (pod.ns.name, port)


@pytest.fixture
def lab() -> Iterator[NetnsLab]:
    require_root()
    require_tools("ip", "setpriv", "iptables-restore", "iptables-save")
    with NetnsLab("smcap") as built:
        yield built


@pytest.fixture
def pods(lab: NetnsLab) -> Pods:
    node = lab.node()
    app, peer, other = node.add_pod("app"), node.add_pod("peer"), node.add_pod("other")
    listeners = [
        app.ns.spawn(listener_argv(APP_PORTS, name=app.ns.name), uid=PROXY_UID, gid=PROXY_UID),
        peer.ns.spawn(listener_argv([8080, 5432], name=peer.ns.name), uid=APP_UID, gid=APP_UID),
        other.ns.spawn(listener_argv([8080], name=other.ns.name), uid=APP_UID, gid=APP_UID),
    ]
    for proc in listeners:
        proc.expect("listening")
    return Pods(node, app, peer, other)


def test_inbound_is_redirected_to_15006_except_excluded_ports(pods: Pods) -> None:
    sidemesh(pods.app.ns, "--exclude-inbound-ports", "15020,15021,15090,9000")
    reply = probe(pods.peer.ns, pods.app.ip, 8080, uid=APP_UID)
    assert landed(reply, pods.app, 15006), reply
    assert reply["orig"] == f"{pods.app.ip}:8080"  # what the inbound proxy forwards to
    assert landed(probe(pods.peer.ns, pods.app.ip, 9000), pods.app, 9000)
    assert landed(probe(pods.peer.ns, pods.app.ip, 15021), pods.app, 15021)  # always excluded
    # the kubelet's view: from the node, probes to 15021 are not captured either
    assert landed(probe(pods.node.ns, pods.app.ip, 15021), pods.app, 15021)
    assert landed(probe(pods.node.ns, pods.app.ip, 8080), pods.app, 15006)


def test_outbound_goes_to_15001_except_excluded_ports_and_cidrs(pods: Pods) -> None:
    sidemesh(
        pods.app.ns,
        "--exclude-outbound-ports", "5432",
        "--exclude-outbound-cidrs", f"{pods.other.ip}/32",
    )  # fmt: skip
    reply = pods.from_app(pods.peer.ip, 8080)
    assert landed(reply, pods.app, 15001), reply
    assert reply["orig"] == f"{pods.peer.ip}:8080"  # the outbound proxy's original destination
    assert landed(pods.from_app(pods.peer.ip, 5432), pods.peer, 5432)
    assert landed(pods.from_app(pods.other.ip, 8080), pods.other, 8080)


def test_include_lists_capture_only_what_they_name(pods: Pods) -> None:
    sidemesh(
        pods.app.ns,
        "--include-inbound-ports", "8080",
        "--include-outbound-cidrs", f"{pods.peer.ip}/32",
    )  # fmt: skip
    assert landed(probe(pods.peer.ns, pods.app.ip, 8080), pods.app, 15006)
    assert landed(probe(pods.peer.ns, pods.app.ip, 9000), pods.app, 9000)
    assert landed(pods.from_app(pods.peer.ip, 8080), pods.app, 15001)
    assert landed(pods.from_app(pods.other.ip, 8080), pods.other, 8080)


def test_empty_include_lists_capture_nothing(pods: Pods) -> None:
    sidemesh(pods.app.ns, "--include-inbound-ports", "", "--include-outbound-cidrs", "")
    assert landed(probe(pods.peer.ns, pods.app.ip, 8080), pods.app, 8080)
    assert landed(pods.from_app(pods.peer.ip, 8080), pods.peer, 8080)


def test_proxy_uid_and_gid_are_never_captured(pods: Pods) -> None:
    sidemesh(pods.app.ns)
    assert landed(pods.from_app(pods.peer.ip, 8080), pods.app, 15001)  # an app: captured
    assert landed(pods.from_app(pods.peer.ip, 8080, uid=PROXY_UID), pods.peer, 8080)
    # the gid alone is enough (a process of another uid in the proxy's group)
    assert landed(pods.from_app(pods.peer.ip, 8080, uid=APP_UID, gid=PROXY_UID), pods.peer, 8080)


def test_app_loopback_and_own_pod_ip_are_left_alone(pods: Pods) -> None:
    sidemesh(pods.app.ns)
    reply = pods.from_app("127.0.0.1", 8080)
    assert reply["ok"] and reply["port"] == 8080 and reply["orig"] == "127.0.0.1:8080"
    # the app calling itself by its pod IP talks to itself directly (webhook/dataplane/capture.py)
    assert landed(pods.from_app(pods.app.ip, 8080), pods.app, 8080)


def test_inbound_passthrough_source_is_exempt(pods: Pods) -> None:
    # Envoy hands inbound connections to the app from 127.0.0.6; even with the proxy's uid set
    # to one nobody uses, that hop must reach the app, not 15001 again.
    sidemesh(pods.app.ns, "--proxy-uid", "4242", "--proxy-gid", "4242")
    reply = pods.from_app(pods.app.ip, 8080, uid=PROXY_UID, source="127.0.0.6")
    assert landed(reply, pods.app, 8080), reply
    assert reply["peer"].startswith("127.0.0.6:")


def test_rerun_is_idempotent_and_replaces_our_rules(pods: Pods) -> None:
    ns = pods.app.ns
    assert "capture installed" in sidemesh(ns).stderr
    first = nat_rules(ns)
    sidemesh(ns)
    assert "already in place, unchanged" in sidemesh(ns).stderr
    assert nat_rules(ns) == first  # the same rules, once
    done = sidemesh(ns, "--exclude-outbound-ports", "5432")  # a re-run with other options
    assert "capture installed" in done.stderr
    assert len(nat_rules(ns)) == len(first) + 1
    assert landed(pods.from_app(pods.peer.ip, 5432), pods.peer, 5432)


def test_cleanup_removes_only_ours(pods: Pods) -> None:
    ns = pods.app.ns
    foreign = "*nat\n:FOREIGN - [0:0]\n-A FOREIGN -p tcp --dport 7 -j RETURN\n"
    foreign += "-A OUTPUT -p tcp -j FOREIGN\n-A PREROUTING -p udp -j RETURN\nCOMMIT\n"
    ns.run(["iptables-restore", "--noflush"], input=foreign)
    before = nat_rules(ns)
    sidemesh(ns)
    assert landed(probe(pods.peer.ns, pods.app.ip, 8080), pods.app, 15006)
    after = nat_rules(ns)
    assert [rule for rule in after if "SIDEMESH" not in rule] == before  # untouched
    # our jumps are appended: the foreign rules keep their places in front of them
    for hook in ("PREROUTING", "OUTPUT"):
        assert "SIDEMESH" in [r for r in after if r.startswith(f"-A {hook} ")][-1]
    sidemesh(ns, "--cleanup")
    assert nat_rules(ns) == before
    chains = ns.run(["iptables-save", "-t", "nat"]).stdout
    assert ":FOREIGN" in chains and "SIDEMESH" not in chains
    assert landed(probe(pods.peer.ns, pods.app.ip, 8080), pods.app, 8080)
    done = sidemesh(ns, "--cleanup")  # nothing left to remove is not an error
    assert "nothing to remove" in done.stderr


def test_apply_reports_time_and_rule_count(pods: Pods) -> None:
    done = sidemesh(pods.app.ns)
    match = re.search(r"IPv4 capture installed \((\d+) nat rules, ([\d.]+) ms\)", done.stderr)
    assert match, done.stderr
    assert int(match.group(1)) == len(nat_rules(pods.app.ns))
    assert "IPv6" not in done.stderr  # no global IPv6 address in this pod: auto = IPv4 only


def test_ipv6_is_captured_when_the_pod_has_an_ipv6_address(lab: NetnsLab) -> None:
    require_tools("ip6tables-restore", "ip6tables-save")
    node = lab.node(ipv6=True)
    app, peer = node.add_pod("app6"), node.add_pod("peer6")
    assert app.ip6 and peer.ip6
    app.ns.spawn(listener_argv(["[::]:15006", "[::]:15001", "[::]:8080"]), uid=1337, gid=1337)
    peer.ns.spawn(listener_argv(["[::]:8080"]), uid=APP_UID, gid=APP_UID).expect("listening")
    app.ns.wait_port(15001, host="::1")
    done = sidemesh(app.ns)  # --ipv6 auto
    assert "IPv6 capture installed" in done.stderr
    assert "::6/128 added to lo" in done.stderr
    assert "inet6 ::6/128" in app.ns.ip("-6", "addr", "show", "dev", "lo")
    assert "::6/128 on lo" in sidemesh(app.ns).stderr  # a re-run keeps it, once
    reply = probe(peer.ns, app.ip6, 8080, uid=APP_UID)
    assert reply["port"] == 15006 and reply["orig"] == f"[{app.ip6}]:8080", reply
    reply = probe(app.ns, peer.ip6, 8080, uid=APP_UID)
    assert reply["port"] == 15001 and reply["orig"] == f"[{peer.ip6}]:8080", reply
    assert probe(app.ns, peer.ip6, 8080, uid=PROXY_UID)["local"].startswith(f"[{peer.ip6}]")
    sidemesh(app.ns, "--cleanup")
    assert not [r for r in nat_rules(app.ns, "ip6tables-save") if "SIDEMESH" in r]
    assert "::6" not in app.ns.ip("-6", "addr", "show", "dev", "lo")


def test_ipv6_passthrough_source_is_bindable_and_exempt(lab: NetnsLab) -> None:
    # The proxy's hop to an IPv6 app comes from ::6, which init-traffic puts on lo: bindable
    # by an unprivileged uid, answered over lo, and never captured again (proxy uid unused).
    require_tools("ip6tables-restore", "ip6tables-save")
    app = lab.node(ipv6=True).add_pod("app6")
    assert app.ip6
    app.ns.spawn(listener_argv(["[::]:15001", "[::]:8080"], name="app6"), uid=1337, gid=1337)
    app.ns.wait_port(8080, host="::1")
    assert "Cannot assign" in probe(app.ns, app.ip6, 8080, uid=APP_UID, source="::6")["error"]
    sidemesh(app.ns, "--proxy-uid", "4242", "--proxy-gid", "4242")
    reply = probe(app.ns, app.ip6, 8080, uid=PROXY_UID, source="::6")
    assert reply["ok"] and reply["port"] == 8080 and reply["peer"].startswith("[::6]:"), reply


@pytest.mark.parametrize("golden", sorted(p.name for p in (TESTDATA / "iptables").glob("*.rules")))
def test_golden_rules_are_valid_restore_input(lab: NetnsLab, golden: str) -> None:
    require_tools("ip6tables-restore")
    ns = lab.namespace("golden")
    text = (TESTDATA / "iptables" / golden).read_text()
    v4, _, v6 = text.partition("COMMIT\n")
    for tool, part in (("iptables-restore", v4 + "COMMIT\n"), ("ip6tables-restore", v6)):
        ns.run([tool, "--test", "--noflush"], input=part)


def test_missing_iptables_and_missing_net_admin_are_clear_errors(lab: NetnsLab) -> None:
    ns = lab.namespace("errors")
    empty = lab.tmpdir("emptypath")
    done = ns.run(
        [sys.executable, "-m", "webhook", "init-traffic"],
        env={"PATH": str(empty)},
        check=False,
    )
    assert done.returncode == 1
    assert "iptables-save and iptables-restore not found on PATH" in done.stderr
    no_cap = ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin", "--"]
    done = ns.run([*no_cap, sys.executable, "-m", "webhook", "init-traffic"], check=False)
    assert done.returncode == 1 and "CAP_NET_ADMIN is not held" in done.stderr
    assert nat_rules(ns) == []


def test_pod_namespaces_are_not_mistaken_for_the_host(lab: NetnsLab) -> None:
    ns = lab.namespace("detect")
    code = "from webhook.dataplane.netns import in_initial_network_namespace as f; print(f())"
    assert ns.run([sys.executable, "-c", code]).stdout.strip() == "False"
    # a pod also has its own PID namespace, where PID 1 is its own first process
    pod_like = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", code]
    assert ns.run(pod_like).stdout.strip() == "False"


def test_the_host_namespace_is_refused() -> None:
    require_root()
    if not in_initial_network_namespace():
        pytest.skip("pytest itself runs outside the host's network namespace: nothing to refuse")
    # PATH without iptables: were the refusal ever broken, this still could not touch the host
    empty = {"PATH": "/nonexistent"}
    done = subprocess.run(
        [sys.executable, "-m", "webhook", "init-traffic"],
        env=empty,
        capture_output=True,
        text=True,
        cwd="/",
        timeout=30,
    )
    assert done.returncode == 1
    assert "refusing to change iptables in the host's network namespace" in done.stderr
    dry = [sys.executable, "-m", "webhook", "init-traffic", "--dry-run"]
    assert subprocess.run(dry, env=empty, capture_output=True, cwd="/").returncode == 0
    assert os.environ.get("PATH")  # (the test process itself was not changed)
