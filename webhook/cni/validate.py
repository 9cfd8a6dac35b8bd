"""``sidemesh cni validate``: the CNI-mode pod's first init container checks its own capture.

It runs unprivileged, as a uid whose traffic the rules must capture, before the proxy starts.
It listens on the proxy's outbound port on loopback, then opens a connection to an address
that the capture rules send to that port (a documentation address that nothing answers; IPv4,
or IPv6 in a pod without IPv4 routes). Captured, the connection lands on its own listener
and ``SO_ORIGINAL_DST`` names the address it asked for; not captured, it goes nowhere and
the check fails with a message saying what to do. Only the outbound half can be tested from
inside the pod (inbound capture only sees packets arriving from the network); both halves are
installed by the same transaction, so one proves the other was applied.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from dataclasses import dataclass

from webhook.dataplane.capture import CaptureOptions
from webhook.errors import TrafficError

__all__ = ["Target", "check", "target"]

_SO_ORIGINAL_DST = 80
#: Documentation addresses (RFC 5737 TEST-NET-1..3, RFC 3849): routable in a pod, never
#: anybody's service.
_CANDIDATES = {4: ("192.0.2.1", "198.51.100.1", "203.0.113.1"), 6: ("2001:db8::1",)}
_LOOPBACK = {4: "127.0.0.1", 6: "::1"}
_PORT = 15999


@dataclass(frozen=True)
class Target:
    """Where the check connects to."""

    address: str
    port: int
    family: int


def _excluded(address: str, cidrs: tuple[str, ...]) -> bool:
    ip = ipaddress.ip_address(address)
    return any(ip in ipaddress.ip_network(c, strict=False) for c in cidrs)


def target(options: CaptureOptions, family: int = 4) -> Target | None:
    """A destination of ``family`` the rules of ``options`` must capture (None: none is)."""
    port = next(p for p in range(_PORT, 1024, -1) if p not in options.exclude_outbound_ports)
    includes = options.include_outbound_cidrs
    if includes is None:
        candidates = list(_CANDIDATES[family])
    else:
        nets = [ipaddress.ip_network(c, strict=False) for c in includes]
        mine = [n for n in nets if n.version == family]
        candidates = [str(n.network_address + (1 if n.num_addresses > 2 else 0)) for n in mine]
    for address in candidates:
        if not _excluded(address, options.exclude_outbound_cidrs):
            return Target(address, port, family)
    return None


def _original_dst(conn: socket.socket, family: int) -> tuple[str, int]:
    if family == 4:
        raw = conn.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)
        port, packed = struct.unpack_from("!2xH4s", raw)
        return socket.inet_ntoa(packed), port
    raw = conn.getsockopt(socket.IPPROTO_IPV6, _SO_ORIGINAL_DST, 28)  # IP6T_SO_ORIGINAL_DST
    port, packed = struct.unpack_from("!2xH4x16s", raw)
    return socket.inet_ntop(socket.AF_INET6, packed), port


class _NoRoute(Exception):
    """The pod has no route for this family: try the other one."""


def check(options: CaptureOptions, *, timeout: float = 3.0) -> str:
    """Prove the outbound redirect is in place; a line to print, or TrafficError.

    IPv4 first; an IPv6-only pod (no IPv4 route at all) is checked over IPv6."""
    goals = [g for g in (target(options, 4), target(options, 6)) if g is not None]
    if not goals:
        return "no outbound traffic is captured for this pod: nothing to check"
    for goal in goals:
        try:
            return _check(goal, options.outbound_port, timeout, last=goal is goals[-1])
        except _NoRoute:
            continue
    raise TrafficError(_not_captured(goals[-1], "no route"))  # the last goal raises itself


def _check(goal: Target, port: int, timeout: float, *, last: bool) -> str:
    af = socket.AF_INET if goal.family == 4 else socket.AF_INET6
    listener = socket.socket(af, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    local = _LOOPBACK[goal.family]
    try:
        listener.bind((local, port))
    except OSError as exc:
        listener.close()
        raise TrafficError(
            f"cannot listen on {local} port {port} for the check: {exc.strerror} "
            "(sidemesh-validate must run before the proxy)"
        ) from None
    with listener:
        listener.listen(1)
        listener.settimeout(timeout)
        try:
            client = socket.create_connection((goal.address, goal.port), timeout=timeout)
        except OSError as exc:
            if exc.errno == errno.ENETUNREACH and not last:
                raise _NoRoute from None
            raise TrafficError(_not_captured(goal, str(exc.strerror or exc))) from None
        with client:
            try:
                conn, _ = listener.accept()
            except OSError:
                raise TrafficError(_not_captured(goal, "someone else answered")) from None
            with conn:
                seen = _original_dst(conn, goal.family)
    if seen != (goal.address, goal.port):
        raise TrafficError(_not_captured(goal, f"a connection to {seen[0]}:{seen[1]} arrived"))
    return (
        f"traffic capture in place: a connection to {_show(goal)} was redirected to the "
        f"proxy's port {port}"
    )


def _show(goal: Target) -> str:
    return f"[{goal.address}]:{goal.port}" if goal.family == 6 else f"{goal.address}:{goal.port}"


def _not_captured(goal: Target, what: str) -> str:
    return (
        f"traffic capture is NOT in place: a connection to {_show(goal)} was not "
        f"redirected to the proxy ({what}). The sidemesh CNI plugin did not run for this pod: "
        "is the sidemesh-cni DaemonSet ready on this node (kubectl -n kube-system get "
        "pods -l app.kubernetes.io/name=sidemesh-cni -o wide)? Once it is, delete this pod so "
        "that it is created again with its capture. (Or opt the pod out of CNI mode with "
        'annotation sidemesh.io/cni: "false".)'
    )
