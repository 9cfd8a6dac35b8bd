"""The capture rules, as ``iptables-restore`` input for the nat table (pure, no I/O).

:func:`rules` turns :class:`CaptureOptions` into the text the init container feeds to
``iptables-restore --noflush`` (IPv4) or ``ip6tables-restore --noflush`` (IPv6).
:func:`apply_input` and :func:`cleanup_input` wrap it for a namespace whose current nat table
(``iptables-save -t nat``) is known, so that re-running replaces exactly sidemesh's chains and
jump rules and nothing else. The applier with the I/O is :mod:`webhook.dataplane.netns`.

Four chains of our own, two jumps into them (REDIRECT mode, TCP only)::

    PREROUTING -p tcp ─► SIDEMESH_INBOUND ──► SIDEMESH_IN_REDIRECT  (REDIRECT → 15006)
    OUTPUT     -p tcp ─► SIDEMESH_OUTPUT  ──► SIDEMESH_REDIRECT     (REDIRECT → 15001)

Why each rule sits where it does (first match wins inside a chain; RETURN = not captured):

SIDEMESH_INBOUND (connections *arriving* at the pod; PREROUTING only sees packets from the
network — a connection the pod opens to itself was already handled in OUTPUT, and nat rules are
consulted once per connection):

1. excluded ports RETURN first — 15020 (rewritten probes), 15021 (proxy health), 15090 (stats)
   are always among them, so the kubelet and Prometheus reach the proxy's own listeners even
   when an include-list names the same port: an exclusion beats an inclusion;
2. then every other port (``*``) or only the included ports jump to SIDEMESH_IN_REDIRECT.

SIDEMESH_OUTPUT (connections the pod *opens*):

1. ``-s 127.0.0.6 -o lo`` RETURN: the inbound proxy hands accepted connections to the app from
   this source address; recapturing that hop sends the proxy into itself, connection after
   connection, in PERMISSIVE mode. Today rules 2 and 3 would let this hop pass as well;
   this rule states the exemption on its own and comes first, so that it holds whatever uid
   the proxy runs as and however loopback is treated below.
2. uid 1337, then gid 1337 RETURN: the proxy's own upstream connections (and the agent's calls
   to the CA and the app's probes) must leave as they are; ``-m owner`` exists only in
   OUTPUT/POSTROUTING, which is why this is decided here and not in the inbound chain.
3. ``-o lo`` RETURN: the app's loopback traffic is left alone — 127.0.0.1 *and* the pod's own
   IP, which the kernel also routes over lo. An app calling itself by its pod IP therefore
   talks to itself directly: the connection never leaves the pod, so there is nothing for
   mTLS to protect, and a proxy hop that could only answer with its own policy would turn a
   local call into a failure in STRICT mode. (Istio makes the same choice for an app's direct
   pod-IP calls; its extra rule that sends the *proxy's* lo traffic back inbound exists for
   service-VIP routing, which sidemesh's original-destination proxy does not do.)
4. excluded outbound ports, then excluded CIDRs RETURN: exclusions beat the include-list.
5. all other destinations (``*``) or only the included CIDRs jump to SIDEMESH_REDIRECT.

The IPv6 variant is the same with ``::6`` as the passthrough source and only the IPv6 CIDRs of
the include/exclude lists (an include-list without IPv6 CIDRs captures no IPv6 outbound).
``::6`` is not a loopback address in IPv6: the applier (:mod:`webhook.dataplane.netns`) assigns
``::6/128`` to ``lo`` along with these rules, so that the proxy can bind it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from webhook import names
from webhook.config import DEFAULTS
from webhook.errors import TrafficError
from webhook.values import check_port, parse_cidr, parse_cidr_list, parse_port_list

__all__ = [
    "CHAINS",
    "INBOUND_PASSTHROUGH_SOURCE_V6",
    "CaptureOptions",
    "Family",
    "apply_input",
    "cleanup_input",
    "parse_cidrs",
    "parse_ports",
    "rule_count",
    "rules",
    "sidemesh_state",
]

Family = Literal[4, 6]

INBOUND = "SIDEMESH_INBOUND"
IN_REDIRECT = "SIDEMESH_IN_REDIRECT"
OUTPUT = "SIDEMESH_OUTPUT"
REDIRECT = "SIDEMESH_REDIRECT"
#: Our chains, in the order they are declared (and flushed) and deleted.
CHAINS: tuple[str, ...] = (INBOUND, IN_REDIRECT, OUTPUT, REDIRECT)
#: Where each chain is jumped to from.
_HOOKS = (("PREROUTING", INBOUND), ("OUTPUT", OUTPUT))

#: The inbound passthrough source for IPv6: the proxy binds it for its hop to an IPv6 app;
#: init-traffic assigns it to lo (IPv6 has no loopback range beyond ::1).
INBOUND_PASSTHROUGH_SOURCE_V6 = "::6"

_PORTS = DEFAULTS.ports


@dataclass(frozen=True)
class CaptureOptions:
    """What to capture; mirrors the ``sidemesh init-traffic`` flags (docs/CONTRACTS.md, section 2).

    ``None`` for an include-list means ``*`` (everything); an empty tuple means nothing."""

    proxy_uid: int = DEFAULTS.proxy.uid
    proxy_gid: int = DEFAULTS.proxy.gid
    inbound_port: int = _PORTS.inbound
    outbound_port: int = _PORTS.outbound
    include_inbound_ports: tuple[int, ...] | None = None
    exclude_inbound_ports: tuple[int, ...] = _PORTS.never_captured_inbound()
    include_outbound_cidrs: tuple[str, ...] | None = None
    exclude_outbound_cidrs: tuple[str, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for flag, value in (("--proxy-uid", self.proxy_uid), ("--proxy-gid", self.proxy_gid)):
            # 0 would exempt root, i.e. most apps, from capture
            if not 1 <= value < 2**32:
                raise TrafficError(f"{flag} {value}: must be a non-root id")
        ports = [("--inbound-port", self.inbound_port), ("--outbound-port", self.outbound_port)]
        for flag, port in ports:
            _check_port(flag, port)
        if self.inbound_port == self.outbound_port:
            raise TrafficError("--inbound-port and --outbound-port must differ")
        for flag, many in (
            ("--include-inbound-ports", self.include_inbound_ports or ()),
            ("--exclude-inbound-ports", self.exclude_inbound_ports),
            ("--exclude-outbound-ports", self.exclude_outbound_ports),
        ):
            for port in many:
                _check_port(flag, port)
        cidr_lists = (
            ("--include-outbound-cidrs", self.include_outbound_cidrs or ()),
            ("--exclude-outbound-cidrs", self.exclude_outbound_cidrs),
        )
        for flag, cidrs in cidr_lists:
            for cidr in cidrs:
                _check_cidr(flag, cidr)


# The flags are checked with the parsers the injector reads annotations with (webhook.values):
# what the injector accepts and writes, init-traffic accepts, and the errors read the same
# (``--flag='value': reason``, like ``annotation name='value': reason``).


def _check_port(flag: str, port: int) -> None:
    try:
        check_port(port)
    except ValueError as exc:
        raise TrafficError(f"{flag}={port!r}: {exc}") from None


def _check_cidr(flag: str, cidr: str) -> None:
    try:
        parse_cidr(cidr)
    except ValueError as exc:
        raise TrafficError(f"{flag}={cidr!r}: {exc}") from None


def parse_ports(flag: str, text: str) -> tuple[int, ...] | None:
    """``"*"`` → None (all), ``""`` → () (none), ``"80,8080-8081"`` → (80, 8080, 8081)."""
    try:
        ports = parse_port_list(text, allow_all=True)
    except ValueError as exc:
        raise TrafficError(f"{flag}={text!r}: {exc}") from None
    return None if isinstance(ports, str) else ports


def parse_cidrs(flag: str, text: str) -> tuple[str, ...] | None:
    """``"*"`` → None (all), ``""`` → (), else normalised CIDRs (a bare address → ``/32`` or
    ``/128``; ``10.1.2.3/8`` is refused, as in the annotation)."""
    try:
        cidrs = parse_cidr_list(text, allow_all=True)
    except ValueError as exc:
        raise TrafficError(f"{flag}={text!r}: {exc}") from None
    return None if isinstance(cidrs, str) else cidrs


def _family_cidrs(cidrs: Iterable[str], family: Family) -> list[str]:
    return [c for c in cidrs if ipaddress.ip_network(c, strict=False).version == family]


def _unique(ports: Iterable[int]) -> list[int]:
    return list(dict.fromkeys(ports))


def rules(options: CaptureOptions, family: Family = 4) -> str:
    """The ``iptables-restore`` (4) or ``ip6tables-restore`` (6) input for ``options``.

    Declaring a chain (``:NAME - [0:0]``) creates it, or empties it under ``--noflush``; that is
    what makes a re-run replace our chains. The jump rules into them are removed first by
    :func:`apply_input`, which knows the namespace's current state."""
    o = options
    source = names.INBOUND_PASSTHROUGH_SOURCE if family == 4 else INBOUND_PASSTHROUGH_SOURCE_V6
    host = "32" if family == 4 else "128"
    ip = "IPv4" if family == 4 else "IPv6"
    out = [f"# sidemesh traffic capture ({ip}, nat table), written by `sidemesh init-traffic`"]
    if family == 6:
        out.append(f"# (init-traffic also assigns {source}/{host} to lo: the proxy binds it)")
    out.append("*nat")
    out += [f":{chain} - [0:0]" for chain in CHAINS]
    out.append(f"-A {IN_REDIRECT} -p tcp -j REDIRECT --to-ports {o.inbound_port}")
    out.append(f"-A {REDIRECT} -p tcp -j REDIRECT --to-ports {o.outbound_port}")

    out.append("# inbound: exclusions first, then the captured ports")
    include_in = o.include_inbound_ports
    if include_in == ():
        out.append("# (no inbound port is captured)")
    else:
        excluded = _unique([*_PORTS.never_captured_inbound(), *o.exclude_inbound_ports])
        out += [f"-A {INBOUND} -p tcp --dport {port} -j RETURN" for port in excluded]
        if include_in is None:
            out.append(f"-A {INBOUND} -p tcp -j {IN_REDIRECT}")
        else:
            kept = [port for port in _unique(include_in) if port not in excluded]
            out += [f"-A {INBOUND} -p tcp --dport {port} -j {IN_REDIRECT}" for port in kept]

    out.append("# outbound: the proxy's passthrough hop, the proxy itself, loopback, exclusions")
    include_out = o.include_outbound_cidrs
    family_includes = None if include_out is None else _family_cidrs(include_out, family)
    if family_includes == []:
        out.append(f"# (no {ip} destination is captured)")
    else:
        out.append(f"-A {OUTPUT} -s {source}/{host} -o lo -j RETURN")
        out.append(f"-A {OUTPUT} -m owner --uid-owner {o.proxy_uid} -j RETURN")
        out.append(f"-A {OUTPUT} -m owner --gid-owner {o.proxy_gid} -j RETURN")
        out.append(f"-A {OUTPUT} -o lo -j RETURN")
        ports = _unique(o.exclude_outbound_ports)
        out += [f"-A {OUTPUT} -p tcp --dport {port} -j RETURN" for port in ports]
        for cidr in _family_cidrs(dict.fromkeys(o.exclude_outbound_cidrs), family):
            out.append(f"-A {OUTPUT} -d {parse_cidr(cidr)} -j RETURN")
        if family_includes is None:
            out.append(f"-A {OUTPUT} -j {REDIRECT}")
        else:
            for cidr in dict.fromkeys(family_includes):
                out.append(f"-A {OUTPUT} -d {parse_cidr(cidr)} -j {REDIRECT}")

    out.append("# the jumps into our chains (appended: rules already in the pod stay first)")
    out += [f"-A {hook} -p tcp -j {chain}" for hook, chain in _HOOKS]
    out.append("COMMIT")
    return "\n".join(out) + "\n"


# --- working with a namespace's current nat table ------------------------------------------


@dataclass(frozen=True)
class SidemeshState:
    """What of ours an ``iptables-save -t nat`` output contains."""

    chains: tuple[str, ...]
    """Our chains that exist."""
    jumps: tuple[str, ...]
    """Rules (``-A HOOK …``, as saved) in chains not ours that jump into one of ours."""


def sidemesh_state(saved: str) -> SidemeshState:
    """Parse ``iptables-save -t nat`` output for our chains and the jumps into them."""
    chains: list[str] = []
    jumps: list[str] = []
    in_nat = False
    for line in saved.splitlines():
        line = line.strip()
        if line.startswith("*"):
            in_nat = line == "*nat"
        elif not in_nat:
            continue
        elif line.startswith(":"):
            name = line[1:].split()[0]
            if name in CHAINS:
                chains.append(name)
        elif line.startswith("-A "):
            words = line.split()
            if words[1] not in CHAINS and any(
                word in CHAINS and words[i - 1] in ("-j", "-g") for i, word in enumerate(words)
            ):
                jumps.append(line)
    return SidemeshState(tuple(chains), tuple(jumps))


def _delete_jumps(state: SidemeshState) -> list[str]:
    return ["-D " + jump[len("-A ") :] for jump in state.jumps]


def apply_input(saved: str, options: CaptureOptions, family: Family = 4) -> str:
    """``--noflush`` input that removes our old jump rules, then (re)writes our chains and
    jumps, in one transaction: a re-run leaves the same rules, once."""
    deletes = _delete_jumps(sidemesh_state(saved))
    text = rules(options, family)
    if not deletes:
        return text
    head, sep, tail = text.partition("*nat\n")
    return head + sep + "# remove the jumps of a previous run\n" + "\n".join(deletes) + "\n" + tail


def cleanup_input(saved: str) -> str | None:
    """``--noflush`` input that removes our jumps and chains (None when there is nothing)."""
    state = sidemesh_state(saved)
    if not state.chains and not state.jumps:
        return None
    out = ["# remove sidemesh traffic capture", "*nat", *_delete_jumps(state)]
    out += [f"-F {chain}" for chain in state.chains]  # chains refer to each other: empty all
    out += [f"-X {chain}" for chain in state.chains]  # … before deleting any
    out.append("COMMIT")
    return "\n".join(out) + "\n"


def rule_count(saved: str) -> int:
    """Number of rules (``-A`` lines) in the nat table of ``iptables-save`` output."""
    state_nat = False
    count = 0
    for line in saved.splitlines():
        if line.startswith("*"):
            state_nat = line.strip() == "*nat"
        elif state_nat and line.startswith("-A "):
            count += 1
    return count
