"""``sidemesh cni install``: the node agent (a DaemonSet pod) that keeps sidemesh in the node's
CNI chain. The I/O edge around :mod:`webhook.cni.conflist` and :mod:`webhook.cni.bundle`.

One pass (:func:`reconcile`) makes the node right, doing only what is missing:

1. the plugin in the CNI bin directory: the launcher ``sidemesh-cni`` and its code directory
   ``sidemesh-cni.d`` (:mod:`webhook.cni.bundle`), copied when absent or different;
2. sidemesh's entry last in the chain of the runtime's config file (the first in lexical
   order); a single-plugin ``.conf`` becomes a ``.conflist`` of the same name.

:func:`watch` repeats the pass every few seconds — the primary plugin's own agent may rewrite
its file at any time, and then sidemesh is chained in again — until SIGTERM, when
:func:`uninstall` takes sidemesh out of the chain and removes the plugin. While it watches, the
agent also answers the plugin's pod look-ups on a Unix socket in the CNI config directory
(:mod:`webhook.cni.agent`), with its own credentials: the node holds no token file. Every write goes
to a dot-file in the same directory and is renamed over the target, so the runtime never reads
half a file (and never takes the temporary file for a config: it skips dot-files).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from webhook.cni import conflist
from webhook.cni.agent import serve
from webhook.cni.bundle import MANIFEST, PAYLOAD, launcher
from webhook.cni.conflist import PLUGIN_TYPE
from webhook.cni.podinfo import Credentials, PodLookup
from webhook.cni.spec import DEFAULT_EXCLUDE_NAMESPACES
from webhook.errors import SidemeshError

__all__ = [
    "InstallError",
    "Settings",
    "credentials",
    "is_chained",
    "lookups",
    "reconcile",
    "uninstall",
    "watch",
]

#: What older versions wrote for the plugin; removed on sight (the node keeps no token now).
KUBECONFIG_NAME = "sidemesh-cni.kubeconfig"
SOCKET_NAME = "sidemesh-cni.sock"
_SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(frozen=True)
class Settings:
    """Where things are, as the installer sees them and as the node (the plugin) sees them."""

    bin_dir: Path
    """The node's CNI bin directory, as mounted into the installer (``/host/opt/cni/bin``)."""
    net_dir: Path
    """The node's CNI config directory, as mounted (``/host/etc/cni/net.d``)."""
    node_net_dir: str = "/etc/cni/net.d"
    """The same directory's path on the node: the plugin finds the agent's socket there."""
    api_server: str = ""
    """``https://host:port``; empty: the in-cluster address (``KUBERNETES_SERVICE_HOST``)."""
    token_file: Path = _SA_DIR / "token"
    ca_file: Path = _SA_DIR / "ca.crt"
    timeout_seconds: float = 5.0
    exclude_namespaces: tuple[str, ...] = DEFAULT_EXCLUDE_NAMESPACES
    plugin_source: Path | None = None
    """A prebuilt payload directory (``sidemesh cni build-plugin``); None: built from this
    environment on first use."""

    def entry(self) -> dict[str, Any]:
        """sidemesh's entry in the chain."""
        return {
            "type": PLUGIN_TYPE,
            "agent_socket": f"{self.node_net_dir.rstrip('/')}/{SOCKET_NAME}",
            "timeout_seconds": self.timeout_seconds,
            "exclude_namespaces": list(self.exclude_namespaces),
        }


_BUILT: dict[str, Path] = {}


def _payload_source(settings: Settings) -> Path:
    if settings.plugin_source is not None:
        return settings.plugin_source
    if "payload" not in _BUILT:
        from webhook.cni.bundle import build

        target = Path(tempfile.mkdtemp(prefix="sidemesh-cni-")) / PAYLOAD
        build(target)
        _BUILT["payload"] = target
    return _BUILT["payload"]


def _link_or_copy(source: str, dest: str) -> None:
    try:
        os.link(source, dest)  # same filesystem: no copy of the client's many megabytes
    except OSError:
        shutil.copy2(source, dest)


def _install_payload(settings: Settings) -> bool:
    """Make ``bin_dir/sidemesh-cni.d`` a copy of the payload; False when it already was."""
    source = _payload_source(settings)
    target = settings.bin_dir / PAYLOAD
    try:
        wanted = (source / MANIFEST).read_text()
    except OSError as exc:
        raise InstallError(f"{source} is not a plugin payload: {exc.strerror}") from None
    try:
        if (target / MANIFEST).read_text() == wanted:
            return False
    except OSError:
        pass
    fresh = settings.bin_dir / f".{PAYLOAD}.new"
    old = settings.bin_dir / f".{PAYLOAD}.old"
    for leftover in (fresh, old):
        shutil.rmtree(leftover, ignore_errors=True)
    shutil.copytree(source, fresh, copy_function=_link_or_copy)
    if target.exists():
        target.rename(old)
    fresh.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return True


class InstallError(SidemeshError):
    """The node's CNI directories or the agent's credentials are not usable."""


def _write(path: Path, data: bytes, mode: int) -> bool:
    """Atomically make ``path`` hold ``data``; False when it already did."""
    try:
        if path.read_bytes() == data and (path.stat().st_mode & 0o777) == mode:
            return False
    except OSError:
        pass
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def _api_server(settings: Settings) -> str:
    if settings.api_server:
        return settings.api_server
    host, port = (
        os.environ.get("KUBERNETES_SERVICE_HOST"),
        os.environ.get("KUBERNETES_SERVICE_PORT"),
    )
    if not host or not port:
        raise InstallError(
            "KUBERNETES_SERVICE_HOST/_PORT are not set: run in a pod, or pass --api-server"
        )
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def credentials(settings: Settings) -> Credentials:
    """The agent's API access: its own identity (RBAC: get pods, nothing else)."""
    try:
        token = settings.token_file.read_text().strip()
        settings.ca_file.read_bytes()
    except OSError as exc:
        raise InstallError(f"cannot read the service account's credentials: {exc}") from None
    return (_api_server(settings), token, str(settings.ca_file))


def _chain(settings: Settings) -> list[str]:
    """Insert our entry into the runtime's config file; what changed."""
    try:
        names = os.listdir(settings.net_dir)
    except OSError as exc:
        raise InstallError(f"cannot list {settings.net_dir}: {exc.strerror}") from None
    chosen = conflist.choose(names)
    if chosen is None:
        return []  # no primary plugin yet (a new node): the next pass chains in
    path = settings.net_dir / chosen
    try:
        current = conflist.parse(chosen, path.read_text())
    except OSError as exc:
        raise InstallError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise InstallError(str(exc)) from None
    if conflist.has_entry(current, settings.entry()) and chosen.endswith(".conflist"):
        return []
    text = conflist.render(conflist.insert(current, settings.entry())).encode()
    if chosen.endswith(".conflist"):
        _write(path, text, 0o644)
        return [f"chained into {chosen}"]
    target = path.with_suffix(".conflist")
    _write(target, text, 0o644)
    path.unlink()
    return [f"chained into {target.name} (converted from {chosen})"]


def is_chained(settings: Settings) -> bool:
    """Whether the runtime's config file ends its chain with sidemesh (the agent is ready)."""
    chosen = conflist.choose(os.listdir(settings.net_dir))
    if chosen is None or not chosen.endswith(".conflist"):
        return False
    try:
        current = conflist.parse(chosen, (settings.net_dir / chosen).read_text())
    except (OSError, ValueError):
        return False
    return conflist.has_entry(current, settings.entry())


def reconcile(settings: Settings) -> list[str]:
    """One pass; returns what it changed (empty: the node was already right)."""
    changes = []
    if _install_payload(settings):
        changes.append(f"plugin code copied to {settings.bin_dir / PAYLOAD}")
    if _write(settings.bin_dir / PLUGIN_TYPE, launcher().encode(), 0o755):
        changes.append(f"plugin written to {settings.bin_dir / PLUGIN_TYPE}")
    if (settings.net_dir / KUBECONFIG_NAME).exists():  # an older version's: holds a token
        (settings.net_dir / KUBECONFIG_NAME).unlink()
        changes.append(f"deleted {settings.net_dir / KUBECONFIG_NAME} (no longer used)")
    changes += _chain(settings)
    return changes


def uninstall(settings: Settings) -> list[str]:
    """Take sidemesh out of every config file, remove the plugin (and an old kubeconfig)."""
    changes = []
    for name in sorted(os.listdir(settings.net_dir)):
        if conflist.choose([name]) != name:
            continue
        path = settings.net_dir / name
        try:
            current = conflist.parse(name, path.read_text())
        except (OSError, ValueError):
            continue  # not ours to repair
        if any(p.get("type") == PLUGIN_TYPE for p in current["plugins"]):
            _write(path, conflist.render(conflist.remove(current)).encode(), 0o644)
            changes.append(f"removed from {name}")
    for path in (settings.net_dir / KUBECONFIG_NAME, settings.bin_dir / PLUGIN_TYPE):
        if path.exists():
            path.unlink()
            changes.append(f"deleted {path}")
    if (settings.bin_dir / PAYLOAD).exists():
        shutil.rmtree(settings.bin_dir / PAYLOAD)
        changes.append(f"deleted {settings.bin_dir / PAYLOAD}")
    return changes


def lookups(settings: Settings) -> PodLookup:
    """The pod look-up the agent serves (the official client, the agent's credentials)."""
    return PodLookup(lambda: credentials(settings), timeout=settings.timeout_seconds)


def watch(settings: Settings, *, interval: float = 2.0, ready_file: Path | None = None) -> int:
    """Serve look-ups and reconcile every ``interval`` seconds until SIGTERM/SIGINT, then
    uninstall (out of the chain first, so no ADD is sent to a socket about to close)."""
    stop = threading.Event()
    lookup = lookups(settings)
    try:
        server = serve(settings.net_dir / SOCKET_NAME, lookup)
    except OSError as exc:
        raise InstallError(f"cannot serve on {settings.net_dir / SOCKET_NAME}: {exc}") from None
    lookup.warm_up()  # before sidemesh is chained in, so no ADD waits for the client's imports

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.is_set():
        try:
            for change in reconcile(settings):
                print(f"sidemesh cni: {change}", file=sys.stderr, flush=True)
            ready = is_chained(settings)
        except (SidemeshError, OSError) as exc:
            print(f"sidemesh cni: {exc}", file=sys.stderr, flush=True)
            ready = False
        if ready_file is not None:  # the DaemonSet's readiness probe checks this file
            if ready:
                ready_file.write_text("ready\n")
            else:
                ready_file.unlink(missing_ok=True)
        stop.wait(interval)
    for change in uninstall(settings):
        print(f"sidemesh cni: {change}", file=sys.stderr, flush=True)
    server.close()
    if ready_file is not None:
        ready_file.unlink(missing_ok=True)
    return 0
