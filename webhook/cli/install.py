"""`sidemesh install` and `sidemesh uninstall`: the control plane in a cluster.

What each step does and why it happens in that order is in :mod:`webhook.install.cluster`.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    inst = subparsers.add_parser(
        "install",
        help="install the control plane into the current kubectl context",
        description="Create or reuse the mesh root and the webhook's serving certificate, "
        "render manifests/ with kustomize, apply the control plane, wait for it, then apply "
        "the MutatingWebhookConfiguration. No private key is written outside --cert-dir or "
        "printed.",
    )
    _common(inst)
    inst.add_argument(
        "--cert-dir",
        type=Path,
        default=Path("certs"),
        help="where the mesh root is kept or created when the cluster has none (default certs/)",
    )
    inst.add_argument(
        "--image",
        default=None,
        help="sidemesh image for the server, the init container and the proxy "
        "(default: the release image in manifests/)",
    )
    inst.add_argument(
        "--failure-policy",
        choices=("Fail", "Ignore"),
        default="Fail",
        help="Fail (default): pods in meshed namespaces are refused while no injector answers; "
        "Ignore: they start without a sidecar",
    )
    inst.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would be applied (private keys redacted); contact no cluster",
    )
    inst.set_defaults(handler=_install)

    uninst = subparsers.add_parser(
        "uninstall",
        help="remove the webhook configuration first, then the control plane",
    )
    _common(uninst)
    uninst.add_argument("--dry-run", action="store_true", help="print the kubectl commands")
    uninst.set_defaults(handler=_uninstall)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--context", default=None, help="kubectl context (default: current)")
    parser.add_argument(
        "--kubeconfig",
        default=None,
        help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config, as kubectl)",
    )
    parser.add_argument(
        "--manifests", type=Path, default=None, help="kustomize base (default: manifests/)"
    )
    parser.add_argument(
        "--timeout", type=int, default=180, help="seconds to wait for rollouts (default 180)"
    )
    parser.add_argument("--kubectl", default="kubectl", help="kubectl binary (default: kubectl)")


def _options(args: argparse.Namespace) -> Any:
    from webhook.install.cluster import Options
    from webhook.install.render import MANIFESTS

    return Options(
        cert_dir=getattr(args, "cert_dir", Path("certs")),
        manifests=args.manifests or MANIFESTS,
        image=getattr(args, "image", None),
        failure_policy=getattr(args, "failure_policy", "Fail"),
        context=args.context,
        kubeconfig=args.kubeconfig,
        dry_run=args.dry_run,
        timeout_seconds=args.timeout,
        kubectl=args.kubectl,
    )


def _install(args: argparse.Namespace) -> int:
    from webhook.install.cluster import install

    return install(_options(args), now=lambda: datetime.now(UTC), out=sys.stdout, err=sys.stderr)


def _uninstall(args: argparse.Namespace) -> int:
    from webhook.install.cluster import uninstall

    return uninstall(_options(args), out=sys.stdout, err=sys.stderr)
