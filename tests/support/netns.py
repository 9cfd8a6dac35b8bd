"""A small toolkit for tests that need real network namespaces (root only).

Everything a test creates here is owned by one :class:`NetnsLab` and removed by
:meth:`NetnsLab.close` (also on failure: use it as a context manager or a pytest fixture)::

    with NetnsLab("smcap") as lab:
        node = lab.node()                     # "node" netns with bridge br0, 10.200.0.1/24
        server = node.add_pod("server")       # pod netns, eth0 10.200.0.2/24 on the bridge
        client = node.add_pod("client")       # 10.200.0.3/24
        srv = server.ns.spawn(listener_argv([8080]), uid=1000, gid=1000)
        srv.expect("listening")
        reply = probe(client.ns, server.ip, 8080, uid=1000)
        assert reply["ok"] and reply["port"] == 8080

Safety: namespace names are ``<prefix><pid>-<n>-<label>``
so they are unique per run and per helper; veth pairs are created *inside* the namespaces (never
in the host's); pod addresses come from a test-only range that exists only inside these
namespaces, and the node namespace has no uplink, so nothing can leave. Teardown kills what it
started by PID, then every PID still inside each of its namespaces (``ip netns pids``), then
deletes the namespaces by name. Never by pattern.

Processes run as ``ip netns exec NS [unshare --mount --propagation private sh -c 'mount …; exec
"$@"'] [setpriv --reuid U --regid G --clear-groups] ARGV``: every step *execs* the next one, so
the PID we record is the PID of the program itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import itertools
import json
import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.programs import PROGRAMS

__all__ = [
    "PYTHON",
    "Mount",
    "Netns",
    "NetnsLab",
    "Node",
    "Pod",
    "Proc",
    "listener_argv",
    "probe",
    "probe_argv",
]

#: A stdlib-only interpreter that any uid can run (the venv's lives under root's home).
PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable

_CLONE_NEWNET = 0x40000000
_counter = itertools.count(1)


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 30) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _tool(name: str) -> str:
    return shutil.which(name) or name


@dataclass(frozen=True)
class Mount:
    """Bind ``source`` (a host directory) at ``target`` inside the process's own mount namespace."""

    source: str | Path
    target: str
    read_only: bool = False


class Proc:
    """A process started inside a namespace. Output (stdout+stderr merged) is collected by a
    reader thread, so a chatty process never blocks on a full pipe."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        argv: Sequence[str],
        ns: str,
        chain: Sequence[str] = (),
    ) -> None:
        self.popen = popen
        self.argv = list(argv)
        #: the full exec chain that started it (``ip netns exec …`` + argv)
        self.chain = list(chain) or list(argv)
        self.ns = ns
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            self._lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
        self._lines.put(None)

    def output(self) -> str:
        """Everything read so far through :meth:`expect` plus what is still queued."""
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._lines.put(None)
                break
            self._seen.append(line)
        return "\n".join(self._seen)

    def expect(self, text: str, timeout: float = 10.0) -> str:
        """Wait for an output line containing ``text``; return it. Fails with the output so far
        if the process exits or the time runs out first."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"{self.argv[0]} in {self.ns}: no {text!r} in {timeout}s:\n" + self.output()
                )
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self._lines.put(None)
                raise RuntimeError(
                    f"{self.argv[0]} in {self.ns} exited ({self.popen.wait()}) before {text!r}:\n"
                    + self.output()
                )
            self._seen.append(line)
            if text in line:
                return line

    def wait_exec(self, timeout: float = 5.0) -> None:
        """Wait until the exec chain (ip, unshare, sh, setpriv) has handed over to ``argv``, so
        that :attr:`pid` is the program's own PID (a signal sent earlier would hit ``ip``).

        Each step of the chain execs the next with a suffix of the full command line, so while
        ``/proc/PID/cmdline`` is one of those wrapper suffixes the program is not running yet.
        (Comparing with ``argv`` alone would hang on programs that rewrite their title.)"""
        wrappers = len(self.chain) - len(self.argv)
        waiting = {("\0".join(self.chain[i:]) + "\0").encode() for i in range(wrappers)}
        deadline = time.monotonic() + timeout
        while self.running():
            try:
                cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes()
            except OSError:
                cmdline = b""
            if cmdline and cmdline not in waiting:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"pid {self.pid} never exec'd {self.argv[0]} in {self.ns}")
            time.sleep(0.005)

    def running(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.running():
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 3.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
        # (the reader thread ends by itself at EOF; a daemon that inherited the pipe may hold
        # it open until the namespace sweep, so it is not joined here)
        return self.popen.wait(timeout=10)


class Netns:
    """One named network namespace owned by a :class:`NetnsLab`."""

    def __init__(self, lab: NetnsLab, name: str) -> None:
        self.lab = lab
        self.name = name

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    def ip(self, *args: str) -> str:
        """``ip -n NAME ARGS`` (raises with ip's message on failure)."""
        return _run(["ip", "-n", self.name, *args])

    def command(
        self,
        argv: Sequence[str],
        *,
        uid: int | None = None,
        gid: int | None = None,
        mounts: Sequence[Mount] = (),
    ) -> list[str]:
        """The exec chain that runs ``argv`` in this namespace (see the module docstring)."""
        if (uid is None) != (gid is None):
            raise ValueError("give both uid and gid, or neither")
        # tools resolved here, with our PATH: the process may get another environment
        chain = [_tool("ip"), "netns", "exec", self.name]
        if mounts:
            steps = []
            mount = _tool("mount")
            for m in mounts:
                self.lab._ensure_mount_target(m.target)
                src, dst = shlex.quote(str(m.source)), shlex.quote(m.target)
                steps.append(f"{mount} --bind {src} {dst}")
                if m.read_only:
                    steps.append(f"{mount} -o remount,bind,ro {dst}")
            script = "set -e; " + "; ".join(steps) + '; exec "$@"'
            chain += [_tool("unshare"), "--mount", "--propagation", "private", "--"]
            chain += ["/bin/sh", "-c", script, "sidemesh-pod"]
        if uid is not None:
            chain += [_tool("setpriv"), f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
        return chain + list(argv)

    def spawn(
        self,
        argv: Sequence[str],
        *,
        uid: int | None = None,
        gid: int | None = None,
        mounts: Sequence[Mount] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | Path = "/",
    ) -> Proc:
        """Start ``argv`` in the background; the lab stops it at teardown (by PID)."""
        chain = self.command(argv, uid=uid, gid=gid, mounts=mounts)
        popen = subprocess.Popen(
            chain,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,  # a Ctrl-C of pytest reaches the lab, not the process
        )
        proc = Proc(popen, argv, self.name, chain)
        self.lab._procs.append(proc)
        proc.wait_exec()
        return proc

    def run(
        self,
        argv: Sequence[str],
        *,
        uid: int | None = None,
        gid: int | None = None,
        mounts: Sequence[Mount] = (),
        env: Mapping[str, str] | None = None,
        input: str | None = None,
        timeout: float = 30,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` to completion; ``check`` raises with its output when it fails."""
        chain = self.command(argv, uid=uid, gid=gid, mounts=mounts)
        done = subprocess.run(
            chain,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            cwd="/",
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"in {self.name}: {shlex.join(argv)} exited {done.returncode}\n"
                f"stdout: {done.stdout}\nstderr: {done.stderr}"
            )
        return done

    def pids(self) -> list[int]:
        out = _run(["ip", "netns", "pids", self.name], check=False)
        return [int(p) for p in out.split()]

    def in_namespace(self, fn: Callable[[], Any]) -> Any:
        """Call ``fn`` on a fresh thread that has joined this namespace (setns is per thread), so
        sockets it creates live there. No process is spawned; the caller stays in its own."""
        result: list[Any] = []
        error: list[BaseException] = []

        def body() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
                try:
                    if libc.setns(fd, _CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns failed")
                finally:
                    os.close(fd)
                result.append(fn())
            except BaseException as exc:  # handed to the caller
                error.append(exc)

        thread = threading.Thread(target=body, daemon=True)
        thread.start()
        thread.join()
        if error:
            raise error[0]
        return result[0]

    def wait_port(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        """Wait until ``host:port`` accepts a TCP connection from inside this namespace."""
        import socket

        def attempt() -> bool:
            try:
                socket.create_connection((host, port), timeout=0.5).close()
                return True
            except OSError:
                return False

        deadline = time.monotonic() + timeout
        while not self.in_namespace(attempt):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{host}:{port} in {self.name} not accepting after {timeout}s")
            time.sleep(0.05)


@dataclass(frozen=True)
class Pod:
    """A pod's network namespace joined to a node's bridge."""

    ns: Netns
    ip: str
    ip6: str | None
    iface: str = "eth0"


@dataclass
class Node:
    """A "node" namespace holding bridge ``br0``; pods join it through veth pairs whose ends are
    created directly inside the node and pod namespaces. The node has the subnet's first address
    (so it can play the kubelet, calling pods "from outside") and no other interface: traffic
    to anything but these namespaces has nowhere to go."""

    lab: NetnsLab
    ns: Netns
    subnet: ipaddress.IPv4Network
    subnet6: ipaddress.IPv6Network | None
    pods: list[Pod] = field(default_factory=list)

    @property
    def ip(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def ip6(self) -> str | None:
        return None if self.subnet6 is None else str(self.subnet6.network_address + 1)

    def add_pod(self, label: str, *, default_route: bool = False) -> Pod:
        """A new pod namespace with ``eth0`` on the bridge and the next free address.

        ``default_route`` points the pod's default route at the node (a dead end: the node has
        no uplink) so that connecting to an address outside the subnet reaches the nat OUTPUT
        hook instead of failing with "network unreachable"."""
        index = len(self.pods) + 2
        ns = self.lab.namespace(label)
        peer = f"vp{index}"
        self.ns.ip("link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", ns.name)
        self.ns.ip("link", "set", peer, "master", "br0", "up")
        ip = str(self.subnet.network_address + index)
        ns.ip("addr", "add", f"{ip}/{self.subnet.prefixlen}", "dev", "eth0")
        ip6 = None
        if self.subnet6 is not None:
            ip6 = str(self.subnet6.network_address + index)
            # nodad: the address is usable at once instead of after duplicate detection (~1 s)
            ns.ip("-6", "addr", "add", f"{ip6}/{self.subnet6.prefixlen}", "dev", "eth0", "nodad")
        ns.ip("link", "set", "eth0", "up")
        if default_route:
            ns.ip("route", "add", "default", "via", self.ip)
            if ip6 is not None:
                ns.ip("-6", "route", "add", "default", "via", str(self.ip6))
        pod = Pod(ns=ns, ip=ip, ip6=ip6)
        self.pods.append(pod)
        return pod


class NetnsLab:
    """Owns namespaces, processes and temporary directories; :meth:`close` removes them all.

    ``prefix`` should name the helper (``smcap``, ``sme2e`` …); the PID is appended."""

    def __init__(self, prefix: str) -> None:
        if not prefix.isalnum():
            raise ValueError(f"prefix must be alphanumeric, got {prefix!r}")
        self.prefix = f"{prefix}{os.getpid()}"
        self.namespaces: list[Netns] = []
        self._procs: list[Proc] = []
        self._dirs: list[Path] = []
        self._made_targets: list[Path] = []
        self._nodes = 0
        self._closed = False

    @property
    def processes(self) -> tuple[Proc, ...]:
        """Every process :meth:`Netns.spawn` started in this lab, oldest first."""
        return tuple(self._procs)

    def __enter__(self) -> NetnsLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(raise_errors=exc[0] is None)

    # --- building ------------------------------------------------------------------------

    def namespace(self, label: str) -> Netns:
        """A new namespace ``<prefix><pid>-<n>-<label>`` with loopback up."""
        if not label.replace("-", "").isalnum():
            raise ValueError(f"label must be alphanumeric (dashes allowed), got {label!r}")
        name = f"{self.prefix}-{next(_counter)}-{label}"
        _run(["ip", "netns", "add", name])
        ns = Netns(self, name)
        self.namespaces.append(ns)
        ns.ip("link", "set", "lo", "up")
        return ns

    def node(self, label: str = "node", *, ipv6: bool = False) -> Node:
        """A node namespace with bridge ``br0`` on 10.<200+n>.0.0/24 (and fd00:5e:<n>::/64)."""
        if self._nodes >= 50:
            raise ValueError("at most 50 nodes per lab")
        subnet = ipaddress.IPv4Network(f"10.{200 + self._nodes}.0.0/24")
        subnet6 = ipaddress.IPv6Network(f"fd00:5e:{self._nodes}::/64") if ipv6 else None
        self._nodes += 1
        ns = self.namespace(label)
        ns.ip("link", "add", "br0", "type", "bridge")
        ns.ip("addr", "add", f"{subnet.network_address + 1}/{subnet.prefixlen}", "dev", "br0")
        if subnet6 is not None:
            ns.ip("-6", "addr", "add", f"{subnet6.network_address + 1}/64", "dev", "br0", "nodad")
        ns.ip("link", "set", "br0", "up")
        return Node(self, ns, subnet, subnet6)

    def tmpdir(self, label: str, mode: int = 0o755) -> Path:
        """A fresh directory removed at teardown. ``mkdtemp`` makes 0700 dirs; ``mode`` opens it
        so that other uids (1337, the app's) can traverse it."""
        path = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-{label}-"))
        path.chmod(mode)
        self._dirs.append(path)
        return path

    def _ensure_mount_target(self, target: str) -> None:
        # A bind mount needs an existing mount point. Missing components are created on the
        # host's filesystem (the mount itself stays private). At teardown only those named
        # after this lab are removed: removing a shared one such as /var/lib/sidemesh detaches
        # every mount on that path in *other* mount namespaces (the kernel does that for rmdir
        # of a mount point), so a lab running at the same time (another test run on this
        # machine) saw its pods' /var/lib/sidemesh vanish.
        path = Path(target)
        missing: list[Path] = []
        while not path.exists():
            missing.append(path)
            path = path.parent
        for p in reversed(missing):
            p.mkdir(mode=0o755)
            self._made_targets.append(p)

    # --- teardown ------------------------------------------------------------------------

    def close(self, raise_errors: bool = True) -> None:
        """Stop processes (by PID), sweep each namespace's remaining PIDs, delete the
        namespaces by name, remove directories. Idempotent; errors are collected, and raised
        at the end only when ``raise_errors`` (not while another exception is propagating)."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        for proc in reversed(self._procs):
            try:
                proc.stop()
            except Exception as exc:
                errors.append(f"stopping pid {proc.pid}: {exc}")
        for ns in reversed(self.namespaces):
            try:
                for _ in range(50):
                    pids = ns.pids()
                    if not pids:
                        break
                    for pid in pids:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    time.sleep(0.02)
                else:
                    errors.append(f"{ns.name}: processes left: {ns.pids()}")
                _run(["ip", "netns", "del", ns.name])
            except Exception as exc:
                errors.append(f"deleting {ns.name}: {exc}")
        for path in reversed(self._made_targets):
            if self.prefix in str(path):
                with contextlib.suppress(OSError):
                    path.rmdir()
        for path in self._dirs:
            shutil.rmtree(path, ignore_errors=True)
        if errors:
            message = "netns teardown: " + "; ".join(errors)
            if raise_errors:
                raise RuntimeError(message)
            print(message, file=sys.stderr)


# --- observing where connections land ------------------------------------------------------

#: The listener and its client, as programs (see their docstrings for what they print).
_LISTENER = str(PROGRAMS / "listener.py")
_PROBE = str(PROGRAMS / "probe.py")


def listener_argv(
    ports: Sequence[int | str], host: str = "0.0.0.0", *, name: str = "listener"
) -> list[str]:
    """argv of a listener on each port (``8080``, or ``"127.0.0.1:8080"`` / ``"[::]:8080"``);
    its answers carry ``name`` so a test can tell which pod's listener took a connection."""
    specs = [p if isinstance(p, str) else f"{host}:{p}" for p in ports]
    return [PYTHON, _LISTENER, name, *specs]


def probe_argv(host: str, port: int, source: str = "") -> list[str]:
    return [PYTHON, _PROBE, host, str(port), *([source] if source else [])]


def probe(
    ns: Netns,
    host: str,
    port: int,
    *,
    uid: int | None = None,
    gid: int | None = None,
    source: str = "",
) -> dict[str, Any]:
    """Connect from ``ns`` (as ``uid``/``gid``, default the same as uid) to ``host:port``; return
    the listener's answer plus ``ok``, or ``{"ok": False, "error": …}``."""
    if uid is not None and gid is None:
        gid = uid
    done = ns.run(probe_argv(host, port, source), uid=uid, gid=gid)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result
