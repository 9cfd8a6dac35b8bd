"""The network-namespace toolkit (tests/netns.py) does what the data-plane tests rely on:
isolated, uniquely named namespaces, a bridged "node" that nothing can leave, processes as other
uids with private bind mounts, tracked by PID — and a teardown that leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_root, require_tools
from tests.support.netns import Mount, NetnsLab, listener_argv, probe

pytestmark = pytest.mark.root


@pytest.fixture
def lab() -> Iterator[NetnsLab]:
    require_root()
    require_tools("ip", "setpriv", "unshare")
    with NetnsLab("smcap") as built:
        yield built


def _host_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip() for line in out.splitlines()}


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still "exists"; only a running process counts
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_names_are_unique_and_loopback_is_up(lab: NetnsLab) -> None:
    a, b = lab.namespace("a"), lab.namespace("a")
    assert a.name != b.name
    assert a.name.startswith(f"smcap{os.getpid()}-")
    assert {a.name, b.name} <= _netns_names()
    assert "UP" in a.ip("-o", "link", "show", "lo")
    listener = a.spawn(listener_argv(["127.0.0.1:7000"]))
    listener.expect("listening")
    assert probe(a, "127.0.0.1", 7000)["port"] == 7000
    assert probe(b, "127.0.0.1", 7000)["ok"] is False  # a different stack


def test_node_joins_pods_and_nothing_touches_the_host(lab: NetnsLab) -> None:
    before = _host_links()
    node = lab.node()
    server, client = node.add_pod("server"), node.add_pod("client")
    assert _host_links() == before  # every veth end was created inside the namespaces
    assert (server.ip, client.ip) == ("10.200.0.2", "10.200.0.3")
    server.ns.spawn(listener_argv([8080]), uid=1000, gid=1000).expect("listening")
    reply = probe(client.ns, server.ip, 8080, uid=1000)
    assert reply["ok"] and reply["peer"].startswith(f"{client.ip}:")
    assert probe(node.ns, server.ip, 8080)["peer"].startswith(f"{node.ip}:")  # "the kubelet"
    # no default route: an outside address is unreachable, not routed anywhere
    outside = probe(client.ns, "192.0.2.1", 80)
    assert outside["ok"] is False and "unreachable" in outside["error"]


def test_default_route_ends_at_the_node(lab: NetnsLab) -> None:
    node = lab.node()
    pod = node.add_pod("pod", default_route=True)
    assert f"default via {node.ip}" in pod.ns.ip("route")
    assert node.ns.ip("route").strip().splitlines() == [
        f"10.200.0.0/24 dev br0 proto kernel scope link src {node.ip}"
    ]


def test_spawned_pid_is_the_program_itself_running_as_the_uid(lab: NetnsLab) -> None:
    ns = lab.namespace("uid")
    proc = ns.spawn(["sleep", "30"], uid=1337, gid=1337)
    status = Path(f"/proc/{proc.pid}/status").read_text()
    assert Path(f"/proc/{proc.pid}/comm").read_text().strip() == "sleep"
    assert "Uid:\t1337\t1337" in status and "Gid:\t1337\t1337" in status
    assert os.readlink(f"/proc/{proc.pid}/ns/net") != os.readlink("/proc/self/ns/net")
    assert proc.pid in ns.pids()
    assert lab.processes == (proc,)
    assert ns.run(["id", "-G"], uid=1000, gid=1000).stdout.split() == ["1000"]


def test_spawn_returns_for_programs_whose_command_line_differs_from_argv(lab: NetnsLab) -> None:
    # a script runs as "/bin/sh SCRIPT": its cmdline never equals argv; spawn must not wait
    script = lab.tmpdir("script") / "run.sh"
    script.write_text("#!/bin/sh\necho started\nexec sleep 30\n")
    script.chmod(0o755)
    ns = lab.namespace("script")
    start = time.monotonic()
    proc = ns.spawn([str(script)], uid=1337, gid=1337)
    assert time.monotonic() - start < 2
    proc.expect("started")
    assert Path(f"/proc/{proc.pid}/status").read_text().count("1337") >= 2
    assert proc.stop() == -15  # SIGTERM reached the program itself


def test_two_pods_mount_different_dirs_at_the_same_path(lab: NetnsLab) -> None:
    target = f"/run/{lab.prefix}-toolkit/data"
    seen = []
    for name in ("one", "two"):
        ns = lab.namespace(name)
        src = lab.tmpdir(name)
        (src / "who").write_text(name)
        mounts = [Mount(src, target, read_only=(name == "two"))]
        done = ns.run(
            ["sh", "-c", f"cat {target}/who; touch {target}/x 2>&1 || true"],
            uid=1337,
            gid=1337,
            mounts=mounts,
        )
        seen.append(done.stdout)
    assert seen[0].startswith("one") and "Permission denied" in seen[0]  # 0755 root dir
    assert seen[1].startswith("two") and "Read-only file system" in seen[1]
    assert not Path(target, "who").exists()  # the host never sees the bind mounts


def test_teardown_removes_everything_even_after_a_failure() -> None:
    require_root()
    require_tools("ip", "setpriv")
    with pytest.raises(ZeroDivisionError), NetnsLab("smcap") as lab:
        node = lab.node()
        pod = node.add_pod("pod")
        tracked = pod.ns.spawn(["sleep", "60"], uid=1337, gid=1337)
        # a process the lab did not start (a daemon forked away from its parent)
        stray = int(pod.ns.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"]).stdout)
        mount_root = Path(f"/run/{lab.prefix}-gone")
        pod.ns.run(["true"], mounts=[Mount(lab.tmpdir("m"), str(mount_root / "a/b"))])
        names = {ns.name for ns in lab.namespaces}
        tmp = lab.tmpdir("t")
        assert _alive(tracked.pid) and _alive(stray) and mount_root.exists()
        1 / 0  # noqa: B018 - the test body fails here
    assert not _alive(tracked.pid)
    assert not _alive(stray)
    assert not names & _netns_names()
    assert not tmp.exists()
    assert not mount_root.exists()


def test_wait_port_and_in_namespace(lab: NetnsLab) -> None:
    ns = lab.namespace("wait")
    proc = ns.spawn(listener_argv(["127.0.0.1:7001"]), uid=1000, gid=1000)
    ns.wait_port(7001)
    assert proc.running()
    with pytest.raises(TimeoutError):
        ns.wait_port(7002, timeout=0.3)
    assert ns.in_namespace(lambda: os.readlink("/proc/thread-self/ns/net")) != os.readlink(
        "/proc/self/ns/net"
    )
