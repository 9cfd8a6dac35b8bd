"""Probe rewriting: the kubelet probes the proxy, the proxy probes the app.

With inbound capture and STRICT mTLS a kubelet probe to the app's port would meet Envoy and
fail (the kubelet has no mesh certificate). So httpGet, tcpSocket and grpc probes become
``httpGet :15020 /app-health/<container>/<livez|readyz|startupz>`` — a port that is never
captured — and the original handler, named ports resolved to numbers, goes to the proxy in
``SIDEMESH_APP_PROBES``; the proxy runs it against the app from inside the pod. Periods and
thresholds stay as they were. Left alone: exec probes (they run inside the container), probes
with an explicit ``host`` (they do not target this pod) and probes whose named port the
container does not declare (the kubelet would fail them anyway; rewriting would hide that). Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from webhook import names

__all__ = ["ProbeRewrite", "health_path", "rewrite_container"]

_HANDLERS = ("httpGet", "tcpSocket", "grpc", "exec")


def health_path(container: str, kind: str) -> str:
    """``/app-health/<container>/<livez|readyz|startupz>`` for a probe field name."""
    return f"{names.APP_HEALTH_PREFIX}/{container}/{names.PROBE_KINDS[kind]}"


@dataclass(slots=True)
class ProbeRewrite:
    """What rewriting one container's probes changed."""

    probes: dict[str, dict[str, Any]]
    """probe field (``livenessProbe`` …) → the rewritten probe."""
    originals: dict[str, Any]
    """probe field → the original probe, exactly as it was (for uninject)."""
    handlers: dict[str, dict[str, Any]]
    """``/app-health/…`` path → the original handler for the proxy, ports as numbers."""


def _named_port(container: Mapping[str, Any], name: str) -> int | None:
    """The first declared port called ``name`` with a number (what the kubelet would use).

    Looked up only when a probe names its port: most probes give a number, and a container
    declares a handful of ports, so a scan beats building a name table for every container.
    """
    ports = container.get("ports")
    if isinstance(ports, list):
        for p in ports:
            if isinstance(p, dict) and p.get("name") == name:
                num = p.get("containerPort")
                if isinstance(num, int) and not isinstance(num, bool):
                    return num
    return None


def _resolve(port: Any, container: Mapping[str, Any]) -> int | None:
    if type(port) is int:  # the common case first (and never a bool)
        return port if 1 <= port <= 65535 else None
    if isinstance(port, bool):
        return None
    if isinstance(port, str):
        port = int(port) if port.isascii() and port.isdigit() else _named_port(container, port)
    if isinstance(port, int) and 1 <= port <= 65535:
        return port
    return None


def _handler(probe: Mapping[str, Any], container: Mapping[str, Any]) -> dict[str, Any] | None:
    """The proxy's copy of a probe's handler, or None when the probe is left alone."""
    timeout = probe.get("timeoutSeconds", 1)
    get = probe.get("httpGet")
    if isinstance(get, dict):
        port = _resolve(get.get("port"), container)
        if port is None or get.get("host"):
            return None
        http: dict[str, Any] = {
            "path": get.get("path") or "/",
            "port": port,
            "scheme": get.get("scheme") or "HTTP",
        }
        if get.get("httpHeaders"):
            http["httpHeaders"] = get["httpHeaders"]
        return {"httpGet": http, "timeoutSeconds": timeout}
    tcp = probe.get("tcpSocket")
    if isinstance(tcp, dict):
        port = _resolve(tcp.get("port"), container)
        if port is None or tcp.get("host"):
            return None
        return {"tcpSocket": {"port": port}, "timeoutSeconds": timeout}
    grpc = probe.get("grpc")
    if isinstance(grpc, dict):
        port = _resolve(grpc.get("port"), container)
        if port is None:
            return None
        rpc: dict[str, Any] = {"port": port}
        if grpc.get("service"):
            rpc["service"] = grpc["service"]
        return {"grpc": rpc, "timeoutSeconds": timeout}
    return None  # exec, or no handler at all


_KINDS = tuple(names.PROBE_KINDS.items())


def rewrite_container(container: Mapping[str, Any], probe_port: int) -> ProbeRewrite | None:
    """Rewrite one container's probes; None when there is nothing to rewrite."""
    result: ProbeRewrite | None = None
    prefix = ""
    for kind, short in _KINDS:
        probe = container.get(kind)
        if not isinstance(probe, dict):
            continue  # most containers stop here three times: no probes, nothing built
        handler = _handler(probe, container)
        if handler is None:
            continue
        if result is None:
            result = ProbeRewrite({}, {}, {})
            prefix = f"{names.APP_HEALTH_PREFIX}/{container.get('name', '')}/"
        path = prefix + short
        get = {"path": path, "port": probe_port, "scheme": "HTTP"}
        # The handler moves to where the old one was, so the probe reads the same.
        new: dict[str, Any] = {}
        for k, v in probe.items():
            if k in _HANDLERS:
                new["httpGet"] = get
            else:
                new[k] = v
        result.probes[kind] = new
        result.originals[kind] = probe
        result.handlers[path] = handler
    return result
