"""`sidemesh init-traffic`: the init container's entrypoint (docs/CONTRACTS.md, section 2).

Installs the capture rules of :mod:`webhook.dataplane.capture` in the current network namespace
through :mod:`webhook.dataplane.netns`; ``--dry-run`` prints them (IPv4 and IPv6) and changes
nothing; ``--cleanup`` removes sidemesh's chains and jumps only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from webhook.config import DEFAULTS
from webhook.dataplane.capture import CaptureOptions, parse_cidrs, parse_ports, rules
from webhook.errors import TrafficError

__all__ = ["add_capture_arguments", "capture_options", "options_from_args", "register"]

_PORTS = DEFAULTS.ports
_PROXY = DEFAULTS.proxy


class _Parser(argparse.ArgumentParser):
    """Reports a bad argument as a TrafficError instead of exiting the process."""

    def error(self, message: str) -> NoReturn:
        raise TrafficError(f"init-traffic arguments: {message}")


def capture_options(argv: Sequence[str]) -> CaptureOptions:
    """The capture options of an ``init-traffic`` argument list, parsed exactly as the init
    container parses them: the CNI plugin and ``sidemesh cni validate`` get the same list."""
    parser = _Parser(prog="sidemesh", add_help=False)
    register(parser.add_subparsers(parser_class=_Parser))
    args = parser.parse_args(["init-traffic", *argv])
    if args.dry_run or args.cleanup:
        raise TrafficError(
            "init-traffic arguments: --dry-run and --cleanup are not capture options"
        )
    return options_from_args(args)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "init-traffic",
        help="install the pod's traffic capture rules (the init container)",
        description="Redirect the pod's inbound TCP to the proxy's inbound port and its "
        "outbound TCP to the outbound port (iptables nat, REDIRECT). Traffic of the proxy "
        "uid/gid and the app's loopback traffic are never captured.",
    )
    add_capture_arguments(p)
    p.add_argument(
        "--dry-run", action="store_true", help="print the iptables-restore input, change nothing"
    )
    p.add_argument("--cleanup", action="store_true", help="remove sidemesh's chains and jumps")
    p.add_argument(
        "--ipv6",
        choices=("auto", "on", "off"),
        default="auto",
        help="also program ip6tables: auto = when the pod has a global IPv6 address",
    )
    p.add_argument(
        "--allow-host-namespace",
        action="store_true",
        help="apply even in the host's network namespace (refused otherwise)",
    )
    p.set_defaults(handler=_init_traffic)


def add_capture_arguments(p: argparse.ArgumentParser) -> None:
    """The capture flags (``sidemesh cni validate`` takes them too)."""
    p.add_argument("--proxy-uid", type=int, default=_PROXY.uid, help="never captured")
    p.add_argument("--proxy-gid", type=int, default=_PROXY.gid, help="never captured")
    p.add_argument("--inbound-port", type=int, default=_PORTS.inbound)
    p.add_argument("--outbound-port", type=int, default=_PORTS.outbound)
    p.add_argument(
        "--include-inbound-ports",
        default="*",
        metavar="PORTS",
        help="ports captured inbound: '*' (all), '' (none) or a comma-separated list",
    )
    p.add_argument(
        "--exclude-inbound-ports",
        default=",".join(map(str, _PORTS.never_captured_inbound())),
        metavar="PORTS",
        help="inbound ports left alone (15020, 15021 and 15090 always are)",
    )
    p.add_argument(
        "--include-outbound-cidrs",
        default="*",
        metavar="CIDRS",
        help="destinations captured: '*' (all), '' (none) or comma-separated CIDRs",
    )
    p.add_argument("--exclude-outbound-cidrs", default="", metavar="CIDRS")
    p.add_argument("--exclude-outbound-ports", default="", metavar="PORTS")


def options_from_args(args: argparse.Namespace) -> CaptureOptions:
    """The capture options of parsed capture flags (see :func:`add_capture_arguments`)."""
    exclude_in = parse_ports("--exclude-inbound-ports", args.exclude_inbound_ports)
    exclude_out_ports = parse_ports("--exclude-outbound-ports", args.exclude_outbound_ports)
    exclude_cidrs = parse_cidrs("--exclude-outbound-cidrs", args.exclude_outbound_cidrs)
    for flag, value in (
        ("--exclude-inbound-ports", exclude_in),
        ("--exclude-outbound-ports", exclude_out_ports),
        ("--exclude-outbound-cidrs", exclude_cidrs),
    ):
        if value is None:
            raise TrafficError(f"{flag}: '*' is not allowed here; use the include flag ''")
    return CaptureOptions(
        proxy_uid=args.proxy_uid,
        proxy_gid=args.proxy_gid,
        inbound_port=args.inbound_port,
        outbound_port=args.outbound_port,
        include_inbound_ports=parse_ports("--include-inbound-ports", args.include_inbound_ports),
        exclude_inbound_ports=exclude_in or (),
        include_outbound_cidrs=parse_cidrs("--include-outbound-cidrs", args.include_outbound_cidrs),
        exclude_outbound_cidrs=exclude_cidrs or (),
        exclude_outbound_ports=exclude_out_ports or (),
    )


def _init_traffic(args: argparse.Namespace) -> int:
    from webhook.dataplane import netns as traffic

    if args.dry_run and args.cleanup:
        print("sidemesh init-traffic: --dry-run and --cleanup exclude each other", file=sys.stderr)
        return 2
    if args.cleanup:
        outcomes = traffic.cleanup(ipv6=args.ipv6, allow_host_namespace=args.allow_host_namespace)
        for o in outcomes:
            what = "removed" if o.changed else "nothing to remove"
            loopback = f"; {o.loopback}" if o.loopback else ""
            print(
                f"sidemesh init-traffic: IPv{o.family} {what} "
                f"({o.rules_before} → {o.rules_after} nat rules, {o.seconds * 1000:.1f} ms)"
                + loopback,
                file=sys.stderr,
            )
        return 0
    options = options_from_args(args)
    if args.dry_run:
        sys.stdout.write(rules(options, 4))
        sys.stdout.write(rules(options, 6))
        return 0
    outcomes = traffic.apply(
        options, ipv6=args.ipv6, allow_host_namespace=args.allow_host_namespace
    )
    for o in outcomes:
        what = "capture installed" if o.changed else "capture already in place, unchanged"
        loopback = f"; {o.loopback}" if o.loopback else ""
        print(
            f"sidemesh init-traffic: IPv{o.family} {what} "
            f"({o.rules_after} nat rules, {o.seconds * 1000:.1f} ms)" + loopback,
            file=sys.stderr,
        )
    return 0
