"""`sidemesh …`: the command line, a thin dispatcher.

Each group of sub-commands lives in its own ``webhook.cli.<group>`` module with a
``register(subparsers)`` function that adds its parsers and sets ``handler`` (a function
``(argparse.Namespace) -> int``). Modules import their heavy dependencies (FastAPI, Envoy …)
inside the handler, so ``sidemesh inject`` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from webhook import __version__
from webhook.errors import SidemeshError

__all__ = ["main"]

#: The command modules, in the order their commands appear in ``--help``.
COMMAND_MODULES = (
    "webhook.cli.inject",  # inject, uninject
    "webhook.cli.check",  # check (traffic rules; workloads through webhook.cli.inject)
    "webhook.cli.serve",  # serve
    "webhook.cli.ca",  # ca init | serving-cert | show | bundle
    "webhook.cli.traffic",  # init-traffic
    "webhook.cli.proxy",  # proxy
    "webhook.cli.install",  # install, uninstall
    "webhook.cli.cni",  # cni install | uninstall | validate | plugin | build-plugin
    "webhook.cli.discovery",  # discovery, proxy-status, proxy-config
    "webhook.cli.top",  # top
    "webhook.cli.authz",  # authz-check
    "webhook.cli.ratelimit",  # ratelimit
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidemesh",
        description="sidemesh: a small service mesh for Kubernetes (injector, CA, sidecar).",
    )
    parser.add_argument("--version", action="version", version=f"sidemesh {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except SidemeshError as exc:
        print(f"sidemesh {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`sidemesh inject -f x | less`, quit early): stop quietly as
        # other filters do, with the shell's code for SIGPIPE. stdout now points at /dev/null,
        # so the interpreter's last flush cannot fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
