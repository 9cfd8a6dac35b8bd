"""`sidemesh cni …`: the node agent of CNI mode and the pod-side check (docs/cni.md).

* ``cni install``: put the plugin and its chain entry on the node, keep them there, answer
  the plugin's pod look-ups on a Unix socket (``--once``: one pass, no look-ups), take them
  away on SIGTERM;
* ``cni uninstall``: take them away now;
* ``cni validate ARGS``: the ``sidemesh-validate`` init container (ARGS: init-traffic's);
* ``cni plugin``: the plugin itself, run from this installation (the runtime runs the file
  ``cni install`` wrote; this is for trying it by hand);
* ``cni build-plugin -o DIR``: write the plugin's code directory (``sidemesh-cni.d``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from webhook.cli.traffic import add_capture_arguments
from webhook.cni.spec import DEFAULT_EXCLUDE_NAMESPACES

__all__ = ["register"]


def _dirs(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bin-dir",
        type=Path,
        default=Path("/host/opt/cni/bin"),
        help="the node's CNI bin directory, as mounted (default: %(default)s)",
    )
    p.add_argument(
        "--net-dir",
        type=Path,
        default=Path("/host/etc/cni/net.d"),
        help="the node's CNI config directory, as mounted (default: %(default)s)",
    )


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "cni",
        help="CNI mode: the node agent, the plugin and the pod's validation check",
        description="CNI mode: a node agent chains sidemesh's CNI plugin after the node's "
        "primary plugin; the plugin installs the capture rules while the pod's network is "
        "created, so meshed pods need no NET_ADMIN init container.",
    )
    sub = p.add_subparsers(dest="cni_command", metavar="COMMAND")
    sub.required = True

    inst = sub.add_parser("install", help="install the plugin on this node and keep it chained")
    _dirs(inst)
    inst.add_argument("--node-net-dir", default="/etc/cni/net.d", help="--net-dir on the node")
    inst.add_argument("--api-server", default="", help="https://HOST:PORT (default: in-cluster)")
    inst.add_argument("--token-file", type=Path, default=None, help="service-account token")
    inst.add_argument("--ca-file", type=Path, default=None, help="the API server's CA")
    inst.add_argument("--timeout", type=float, default=5.0, help="API timeout of a look-up (s)")
    inst.add_argument(
        "--exclude-namespace",
        action="append",
        default=None,
        metavar="NS",
        help="namespaces the plugin never looks up (repeat; default: "
        + ", ".join(DEFAULT_EXCLUDE_NAMESPACES)
        + ")",
    )
    inst.add_argument(
        "--plugin-dir", type=Path, default=None, help="copy this prebuilt code directory"
    )
    inst.add_argument("--once", action="store_true", help="one pass, exit (no look-ups)")
    inst.add_argument("--interval", type=float, default=2.0, help="seconds between passes")
    inst.add_argument("--ready-file", type=Path, default=None, help="exists while chained")
    inst.set_defaults(handler=_install)

    un = sub.add_parser("uninstall", help="remove the plugin and its chain entry")
    _dirs(un)
    un.set_defaults(handler=_uninstall)

    val = sub.add_parser(
        "validate",
        help="check that the pod's traffic is captured (the sidemesh-validate container)",
    )
    add_capture_arguments(val)  # the pod's init-traffic arguments
    val.set_defaults(handler=_validate)

    plug = sub.add_parser("plugin", help="run the CNI plugin (CNI_* environment, stdin)")
    plug.set_defaults(handler=_plugin)

    build = sub.add_parser("build-plugin", help="write the plugin's code directory")
    build.add_argument("-o", "--output", type=Path, required=True, help="a new directory")
    build.set_defaults(handler=_build)


def _settings(args: argparse.Namespace) -> Any:
    from webhook.cni.install import Settings

    kwargs: dict[str, Any] = {}
    if args.token_file is not None:
        kwargs["token_file"] = args.token_file
    if args.ca_file is not None:
        kwargs["ca_file"] = args.ca_file
    if args.exclude_namespace is not None:
        kwargs["exclude_namespaces"] = tuple(args.exclude_namespace)
    return Settings(
        bin_dir=args.bin_dir,
        net_dir=args.net_dir,
        node_net_dir=args.node_net_dir,
        api_server=args.api_server,
        timeout_seconds=args.timeout,
        plugin_source=args.plugin_dir,
        **kwargs,
    )


def _install(args: argparse.Namespace) -> int:
    from webhook.cni.install import reconcile, watch

    settings = _settings(args)
    if not args.once:
        return watch(settings, interval=args.interval, ready_file=args.ready_file)
    for change in reconcile(settings) or ["nothing to change"]:
        print(f"sidemesh cni: {change}", file=sys.stderr)
    return 0


def _uninstall(args: argparse.Namespace) -> int:
    from webhook.cni.install import Settings, uninstall

    for change in uninstall(Settings(bin_dir=args.bin_dir, net_dir=args.net_dir)) or [
        "nothing to remove"
    ]:
        print(f"sidemesh cni: {change}", file=sys.stderr)
    return 0


def _validate(args: argparse.Namespace) -> int:
    from webhook.cli.traffic import options_from_args
    from webhook.cni.validate import check
    from webhook.errors import TrafficError

    try:
        line = check(options_from_args(args))
    except TrafficError as exc:
        print(f"sidemesh-validate: {exc}", file=sys.stderr)
        return 1
    print(f"sidemesh-validate: {line}", file=sys.stderr)
    return 0


def _plugin(args: argparse.Namespace) -> int:
    from webhook.cni.plugin import main

    return main()


def _build(args: argparse.Namespace) -> int:
    from webhook.cni.bundle import build

    count = build(args.output)
    print(f"sidemesh cni: plugin code written to {args.output} ({count} files)", file=sys.stderr)
    return 0
