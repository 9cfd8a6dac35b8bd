"""Applying and removing the capture rules in the current network namespace (the I/O edge).

The rules themselves come from :mod:`webhook.dataplane.capture` (pure). This module checks the facts
first and fails with a :class:`~webhook.errors.TrafficError` that says what to do:

- it refuses the host's (initial) network namespace unless told otherwise: capture rules there
  would redirect the whole machine's traffic to a proxy that is not running;
- ``iptables-restore`` / ``iptables-save`` (and the ip6tables pair for IPv6) must be on PATH;
- the process must hold CAP_NET_ADMIN (the init container's ``securityContext.capabilities``).

Then, per address family, it reads the nat table (``iptables-save -t nat``) and feeds
``iptables-restore --noflush`` one transaction that removes our previous jump rules and rewrites
our chains — other chains and rules in the namespace are never touched.

For IPv6 it also assigns the proxy's inbound passthrough source ``::6/128`` to ``lo``. IPv4 has
a whole loopback /8, so 127.0.0.6 is bindable everywhere; IPv6 has only ``::1``, and ``::6`` is
an ordinary (global-scope) address that must be assigned to be bound. On ``lo`` it is local to
the pod and to nothing else: Envoy binds it for its hop to ``[podIPv6]:port``, the app's answer
comes back over ``lo``, and the ``-s ::6 -o lo`` RETURN rule keeps that hop from being captured
again. (Binding ``::1`` instead would work too, but then the app could not tell the proxy's
deliveries from its own local calls, and neither could the capture rules.) The address is set
over rtnetlink directly, because the init image has iptables but no iproute2; ``--cleanup``
removes it again.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import shutil
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from webhook.dataplane.capture import (
    INBOUND_PASSTHROUGH_SOURCE_V6,
    CaptureOptions,
    Family,
    apply_input,
    cleanup_input,
    rule_count,
)
from webhook.errors import TrafficError

__all__ = [
    "Outcome",
    "apply",
    "cleanup",
    "has_global_ipv6",
    "in_initial_network_namespace",
    "loopback_address",
    "saved_nat",
    "want_ipv6",
]

IPv6Mode = Literal["auto", "on", "off"]

#: Inodes of the initial PID and network namespaces (fixed by the kernel; the network one only
#: on recent kernels — dynamically numbered namespaces start at 0xF0000000).
_INITIAL_PID_NS = 0xEFFFFFFC
_INITIAL_NET_NS = 0xEFFFFFF9
_CAP_NET_ADMIN = 12
_TOOLS: dict[int, tuple[str, str]] = {
    4: ("iptables-save", "iptables-restore"),
    6: ("ip6tables-save", "ip6tables-restore"),
}


@dataclass(frozen=True)
class Outcome:
    """What one family's apply or cleanup did."""

    family: Family
    rules_before: int
    rules_after: int
    seconds: float
    changed: bool
    #: what happened to the IPv6 passthrough source on lo ("" for IPv4)
    loopback: str = ""


def in_initial_network_namespace(proc: Path = Path("/proc")) -> bool:
    """True when this process runs in the host's (initial) network namespace.

    Two ways to know, tried in order:

    1. Recent kernels (observed here on 6.18) give the initial network namespace a fixed inode
       number, 0xEFFFFFF9, below the range every other namespace is numbered from
       (0xF0000000 up); that inode means the host's namespace, even seen from a container.
    2. From the initial PID namespace, PID 1 is the host's init: share its network namespace and
       you are in the host's. Inside a container, PID 1 is the container's own first process
       (in the pod's namespace), so this comparison would refuse every pod; there, on older
       kernels, we cannot tell and answer False — the injector never injects ``hostNetwork``
       pods."""
    try:
        net_ns = os.stat(proc / "self/ns/net").st_ino
        if net_ns == _INITIAL_NET_NS:
            return True
        if os.stat(proc / "self/ns/pid").st_ino != _INITIAL_PID_NS:
            return False
        return net_ns == os.stat(proc / "1/ns/net").st_ino
    except OSError:
        return False


def has_global_ipv6(if_inet6: str) -> bool:
    """Whether ``/proc/net/if_inet6`` text lists a global-scope address off loopback."""
    for line in if_inet6.splitlines():
        fields = line.split()
        # address ifindex prefixlen scope flags name; scope 00 = global (ULAs included)
        if len(fields) == 6 and fields[3] == "00" and fields[5] != "lo":
            return True
    return False


def want_ipv6(mode: IPv6Mode, proc: Path = Path("/proc")) -> bool:
    if mode != "auto":
        return mode == "on"
    try:
        return has_global_ipv6((proc / "net/if_inet6").read_text())
    except OSError:  # IPv6 disabled in this kernel
        return False


# --- the IPv6 passthrough source on lo (rtnetlink, no iproute2 needed) ----------------------

_RTM_NEWADDR, _RTM_DELADDR = 20, 21
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_EXCL, _NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
_NLMSG_ERROR = 2
_IFA_ADDRESS, _IFA_LOCAL = 1, 2
_IFA_F_NODAD = 0x2


def _rtnetlink_address(command: int, flags: int, address: str, ifname: str) -> int:
    """Send one RTM_NEWADDR/RTM_DELADDR for ``address``/128 on ``ifname``; return the errno the
    kernel answered with (0: done)."""
    packed = ipaddress.IPv6Address(address).packed
    index = socket.if_nametoindex(ifname)
    # struct ifaddrmsg: family, prefix length, flags, scope (0: global, as `ip` sets it), ifindex
    body = struct.pack("=BBBBI", socket.AF_INET6, 128, _IFA_F_NODAD, 0, index)
    for kind in (_IFA_LOCAL, _IFA_ADDRESS):  # struct rtattr: length, type, value
        body += struct.pack("=HH", 4 + len(packed), kind) + packed
    flags |= _NLM_F_REQUEST | _NLM_F_ACK
    header = struct.pack("=IHHII", 16 + len(body), command, flags, 1, 0)  # struct nlmsghdr
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(5)
        sock.bind((0, 0))
        sock.sendto(header + body, (0, 0))
        reply = sock.recv(65536)
    _length, kind = struct.unpack_from("=IH", reply)
    if kind != _NLMSG_ERROR:
        raise TrafficError(f"rtnetlink: unexpected answer type {kind} to an address request")
    (error,) = struct.unpack_from("=i", reply, 16)
    return -int(error)


def loopback_address(address: str, *, present: bool) -> bool:
    """Make ``address``/128 present on (or absent from) ``lo``; True when something changed."""
    try:
        if present:
            flags = _NLM_F_CREATE | _NLM_F_EXCL
            code = _rtnetlink_address(_RTM_NEWADDR, flags, address, "lo")
            unchanged = code == errno.EEXIST
        else:
            code = _rtnetlink_address(_RTM_DELADDR, 0, address, "lo")
            unchanged = code in (errno.EADDRNOTAVAIL, errno.ENOENT)
    except OSError as exc:
        raise TrafficError(f"cannot change {address} on lo: {exc}") from None
    if code and not unchanged:
        what = "add" if present else "remove"
        raise TrafficError(f"cannot {what} {address}/128 on lo: {os.strerror(code)}")
    return not unchanged


def _holds_net_admin(proc: Path = Path("/proc")) -> bool:
    for line in (proc / "self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> _CAP_NET_ADMIN & 1)
    return False


def _check(families: list[Family], allow_host_namespace: bool) -> None:
    if not allow_host_namespace and in_initial_network_namespace():
        raise TrafficError(
            "refusing to change iptables in the host's network namespace (this would capture "
            "the whole machine's traffic); run inside the pod's namespace, or pass "
            "--allow-host-namespace if you really mean it"
        )
    for family in families:
        missing = [tool for tool in _TOOLS[family] if shutil.which(tool) is None]
        if missing:
            raise TrafficError(
                f"{' and '.join(missing)} not found on PATH: install iptables (Debian/Ubuntu: "
                "apt-get install iptables) in the init container's image"
            )
    if not _holds_net_admin():
        raise TrafficError(
            "CAP_NET_ADMIN is not held: the init container needs "
            "securityContext.capabilities.add: [NET_ADMIN] (and runs as root)"
        )


def _run(argv: list[str], stdin: str | None = None) -> str:
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TrafficError(f"{argv[0]}: {exc}") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip()
        if stdin is not None:
            detail += "\ninput was:\n" + stdin
        raise TrafficError(f"{' '.join(argv)} failed (exit {done.returncode}): {detail}")
    return done.stdout


def _save(family: Family) -> str:
    return _run([_TOOLS[family][0], "-t", "nat"])


def saved_nat(family: Family) -> str:
    """``iptables-save -t nat`` (or ip6tables) of this namespace, for checks."""
    return _save(family)


def _restore(family: Family, text: str) -> None:
    _run([_TOOLS[family][1], "--noflush"], stdin=text)


def _rules_of(saved: str) -> list[str]:
    # iptables-save without its timestamped comments and counters: the rules as they stand
    return [line for line in saved.splitlines() if line.startswith(("-A ", ":"))]


def _families(ipv6: IPv6Mode) -> list[Family]:
    return [4, 6] if want_ipv6(ipv6) else [4]


def apply(
    options: CaptureOptions, *, ipv6: IPv6Mode = "auto", allow_host_namespace: bool = False
) -> list[Outcome]:
    """Install (or replace) the capture rules in this network namespace."""
    families = _families(ipv6)
    _check(families, allow_host_namespace)
    outcomes = []
    for family in families:
        start = time.perf_counter()
        loopback = ""
        if family == 6:
            # before the rules: a proxy that starts once we are done can bind it at once
            added = loopback_address(INBOUND_PASSTHROUGH_SOURCE_V6, present=True)
            loopback = f"{INBOUND_PASSTHROUGH_SOURCE_V6}/128 {'added to' if added else 'on'} lo"
        saved = _save(family)
        _restore(family, apply_input(saved, options, family))
        after = _save(family)
        outcomes.append(
            Outcome(
                family,
                rule_count(saved),
                rule_count(after),
                time.perf_counter() - start,
                changed=_rules_of(saved) != _rules_of(after),
                loopback=loopback,
            )
        )
    return outcomes


def cleanup(*, ipv6: IPv6Mode = "auto", allow_host_namespace: bool = False) -> list[Outcome]:
    """Remove sidemesh's chains and the jumps into them; nothing else."""
    families = _families(ipv6)
    _check(families, allow_host_namespace)
    outcomes = []
    for family in families:
        start = time.perf_counter()
        saved = _save(family)
        text = cleanup_input(saved)
        if text is not None:
            _restore(family, text)
        after = _save(family) if text is not None else saved
        loopback = ""
        if family == 6:
            removed = loopback_address(INBOUND_PASSTHROUGH_SOURCE_V6, present=False)
            where = "removed from" if removed else "not on"
            loopback = f"{INBOUND_PASSTHROUGH_SOURCE_V6}/128 {where} lo"
        outcomes.append(
            Outcome(
                family,
                rule_count(saved),
                rule_count(after),
                time.perf_counter() - start,
                changed=text is not None,
                loopback=loopback,
            )
        )
    return outcomes
