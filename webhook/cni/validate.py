"""``sidemesh cni validate``: the CNI-mode pod's first init container checks its own capture.

It runs unprivileged, as a uid whose traffic the rules must capture, before the proxy starts.
It listens on the proxy's outbound port on loopback, then opens a connection to an address
that the capture rules send to that port (a documentation address, TEST-NET, that nothing
answers). Captured, the connection lands on its own listener and ``SO_ORIGINAL_DST`` names the
address it asked for; not captured, it goes nowhere and the check fails with a message saying
what to do. Only the outbound half can be tested from inside the pod (inbound capture only
sees packets arriving from the network); both halves are installed by the same transaction,
so one proves the other was applied.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from webhook.dataplane.capture import CaptureOptions
from webhook.errors import TrafficError

__all__ = ["Target", "check", "target"]

_SO_ORIGINAL_DST = 80
#: TEST-NET-1..3 (RFC 5737): routable in a pod, never anybody's service.
_CANDIDATES = ("192.0.2.1", "198.51.100.1", "203.0.113.1")
_PORT = 15999


@dataclass(frozen=True)
class Target:
    """Where the check connects to; None when the pod captures no IPv4 outbound traffic."""

    address: str
    port: int


def _excluded(address: str, cidrs: tuple[str, ...]) -> bool:
    ip = ipaddress.ip_address(address)
    return any(ip in ipaddress.ip_network(c, strict=False) for c in cidrs)


def target(options: CaptureOptions) -> Target | None:
    """A destination the rules of ``options`` must capture (None: nothing is captured)."""
    port = next(p for p in range(_PORT, 1024, -1) if p not in options.exclude_outbound_ports)
    includes = options.include_outbound_cidrs
    if includes is None:
        candidates = list(_CANDIDATES)
    else:
        nets = [ipaddress.ip_network(c, strict=False) for c in includes]
        v4 = [n for n in nets if n.version == 4]
        candidates = [str(n.network_address + (1 if n.num_addresses > 2 else 0)) for n in v4]
    for address in candidates:
        if not _excluded(address, options.exclude_outbound_cidrs):
            return Target(address, port)
    return None


def _original_dst(conn: socket.socket) -> tuple[str, int]:
    raw = conn.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


def check(options: CaptureOptions, *, timeout: float = 3.0) -> str:
    """Prove the outbound redirect is in place; a line to print, or TrafficError."""
    goal = target(options)
    if goal is None:
        return "no IPv4 outbound traffic is captured for this pod: nothing to check"
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("127.0.0.1", options.outbound_port))
    except OSError as exc:
        listener.close()
        raise TrafficError(
            f"cannot listen on 127.0.0.1:{options.outbound_port} for the check: {exc.strerror} "
            "(sidemesh-validate must run before the proxy)"
        ) from None
    with listener:
        listener.listen(1)
        listener.settimeout(timeout)
        try:
            client = socket.create_connection((goal.address, goal.port), timeout=timeout)
        except OSError as exc:
            raise TrafficError(_not_captured(goal, str(exc.strerror or exc))) from None
        with client:
            try:
                conn, _ = listener.accept()
            except OSError:
                raise TrafficError(_not_captured(goal, "someone else answered")) from None
            with conn:
                seen = _original_dst(conn)
    if seen != (goal.address, goal.port):
        raise TrafficError(_not_captured(goal, f"a connection to {seen[0]}:{seen[1]} arrived"))
    return (
        f"traffic capture in place: a connection to {goal.address}:{goal.port} was redirected "
        f"to the proxy's port {options.outbound_port}"
    )


def _not_captured(goal: Target, what: str) -> str:
    return (
        f"traffic capture is NOT in place: a connection to {goal.address}:{goal.port} was not "
        f"redirected to the proxy ({what}). The sidemesh CNI plugin did not run for this pod: "
        "is the sidemesh-cni DaemonSet ready on this node (kubectl -n sidemesh-system get "
        "pods -l app.kubernetes.io/name=sidemesh-cni -o wide)? Once it is, delete this pod so "
        "that it is created again with its capture. (Or opt the pod out of CNI mode with "
        'annotation sidemesh.io/cni: "false".)'
    )
