"""Put sidemesh into a cluster, and take it out again, through ``kubectl``.

Install, in this order, and why:

1. **PKI.** The mesh root is reused wherever it already exists — the cluster's Secret
   ``sidemesh-ca`` first (re-installing or upgrading must never swap the root under running
   workloads), else ``ca.crt``/``ca.key`` in the cert dir — and created in the cert dir (key
   mode 0600) only when neither exists. The webhook's serving certificate is reused from the
   cluster's Secret ``sidemesh-tls`` while it is from this root, names the Service and is not in
   its last third of life; otherwise a fresh one is issued.
2. **Render.** ``kubectl kustomize`` builds a throwaway overlay of ``manifests/`` (image,
   failure-policy component, proxy images in the mesh config); the webhook's ``caBundle`` and the
   two Secrets are added to the rendered objects here. Keys travel only through ``kubectl``'s
   stdin: never into the repository, never to the terminal (``--dry-run`` redacts them).
3. **Apply the control plane** (everything but the MutatingWebhookConfiguration), server-side,
   so Secrets do not get a ``last-applied-configuration`` annotation that copies the key.
4. **Wait for the rollouts** (the injector's, then discovery's), and only then
5. **apply the MutatingWebhookConfiguration.** With ``failurePolicy: Fail`` a webhook that
   points at no ready server would refuse pod creation in every meshed namespace; applying it
   last means a failed install leaves pod creation untouched.

Uninstall removes the MutatingWebhookConfiguration *first* and stops if that fails, so pod
creation can never be blocked by a webhook whose server is already gone; then the control-plane
namespace and the cluster-scoped RBAC.

Every ``kubectl`` command goes through a :class:`~webhook.install.runner.Runner`, the seam tests
use to check the order of commands without a cluster; the Secrets of step 1 are read through
the one Kubernetes client (:class:`~webhook.kube.client.KubeClient`, configured like kubectl:
``--kubeconfig``, ``--context``). Step 1 is :mod:`webhook.install.pki`, step 2
:mod:`webhook.install.render` (always the real ``kubectl kustomize``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import yaml

from webhook import names
from webhook.config import load_config
from webhook.install.pki import (
    CA_SECRET,
    DISCOVERY_TLS_SECRET,
    FIELD_MANAGER,
    RATELIMIT_TLS_SECRET,
    REDACTED,
    TLS_SECRET,
    Pki,
    plan_pki,
    redact,
    secrets,
)
from webhook.install.render import MANIFESTS, FailurePolicy, render, with_ca_bundle
from webhook.install.runner import InstallError, Runner, run_subprocess
from webhook.kube.client import KubeAPIError, KubeClient
from webhook.manifests import dump_yaml

__all__ = ["SETTLE_SECONDS", "Options", "install", "uninstall"]

NAMESPACE = names.CONTROL_PLANE_NAMESPACE
#: The Deployments whose rollout the install waits for: the injector, then discovery.
DEPLOYMENTS = (names.SERVICE_NAME, names.DISCOVERY_NAME)
#: Cluster-scoped RBAC objects (the injector's and discovery's, each named like its Service).
CLUSTER_RBAC = tuple(
    f"{kind}/{name}" for name in DEPLOYMENTS for kind in ("clusterrolebinding", "clusterrole")
)


@dataclass(frozen=True)
class Options:
    """What ``sidemesh install`` / ``uninstall`` were asked to do."""

    cert_dir: Path = Path("certs")
    manifests: Path = MANIFESTS
    image: str | None = None
    failure_policy: FailurePolicy = "Fail"
    context: str | None = None
    kubeconfig: str | None = None
    dry_run: bool = False
    timeout_seconds: int = 180
    kubectl: str = "kubectl"

    def kubectl_argv(self, command: str) -> list[str]:
        """A cluster command: kubectl, the kubeconfig and context when chosen, then
        ``command``'s words (sidemesh's names contain no spaces)."""
        config = ["--kubeconfig", self.kubeconfig] if self.kubeconfig else []
        ctx = ["--context", self.context] if self.context else []
        return [self.kubectl, *config, *ctx, *command.split()]

    def kube(self) -> KubeClient:
        """The API client for the same cluster kubectl talks to."""
        return KubeClient.connect(kubeconfig=self.kubeconfig, context=self.context)


def cluster_secrets(kube: KubeClient) -> dict[str, dict[str, bytes]]:
    """The install's Secrets as they are in the cluster now (decoded; never printed);
    a Secret that does not exist is left out."""
    found = {}
    for name in (CA_SECRET, TLS_SECRET, DISCOVERY_TLS_SECRET, RATELIMIT_TLS_SECRET):
        try:
            found[name] = kube.read_secret(name, NAMESPACE)
        except KubeAPIError as exc:
            if exc.status == 404:
                continue
            raise InstallError(
                f"cannot read the existing sidemesh Secrets (is the cluster reachable?): {exc}"
            ) from None
    return found


def _apply(opts: Options, run: Runner, objects: Sequence[dict[str, Any]]) -> str:
    done = run(
        opts.kubectl_argv(
            f"apply --server-side --field-manager={FIELD_MANAGER} --force-conflicts -f -"
        ),
        dump_yaml(list(objects)),
    )
    if done.returncode != 0:
        raise InstallError(f"kubectl apply failed: {done.stderr.strip()}")
    return done.stdout


def _is_webhook_config(obj: Mapping[str, Any]) -> bool:
    return obj.get("kind") == "MutatingWebhookConfiguration"


def _plan(
    opts: Options, kube: Callable[[], KubeClient], now: datetime, err: TextIO
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Steps 1 and 2: (the control plane in apply order, the webhook configuration)."""
    config = load_config(yaml.safe_load((opts.manifests / "config.yaml").read_text("utf-8")))
    rendered = render(
        opts.manifests, image=opts.image, failure_policy=opts.failure_policy, kubectl=opts.kubectl
    )
    if opts.dry_run:
        cluster: dict[str, dict[str, bytes]] = {}
        print(
            "dry run: the cluster is not contacted; a root already installed there would be "
            "reused by a real install",
            file=err,
        )
    else:
        cluster = cluster_secrets(kube())
    pki: Pki = plan_pki(
        cert_dir=opts.cert_dir,
        cluster=cluster,
        now=now,
        serving_ttl=timedelta(seconds=config.ca.serving_cert_ttl_seconds),
        dry_run=opts.dry_run,
        trust_domain=config.trust_domain,
    )
    for note in pki.notes:
        print(note, file=err)
    objects = with_ca_bundle(rendered, pki.ca.root_pem)
    # Namespace first (the Secrets live in it), then the Secrets, so the first server pods
    # find their certificates; the webhook configuration strictly last.
    head = [o for o in objects if o.get("kind") == "Namespace"]
    body = [o for o in objects if o.get("kind") != "Namespace" and not _is_webhook_config(o)]
    hooks = [o for o in objects if _is_webhook_config(o)]
    return [*head, *secrets(pki), *body], hooks


def install(
    opts: Options,
    *,
    run: Runner = run_subprocess,
    kube: Callable[[], KubeClient] | None = None,
    now: Callable[[], datetime],
    out: TextIO,
    err: TextIO,
) -> int:
    """``sidemesh install`` (module docstring). Returns the exit code. ``kube`` gives the API
    client (default: :meth:`Options.kube`); a dry run never calls it."""
    control_plane, hooks = _plan(opts, kube or opts.kube, now(), err)
    if opts.dry_run:
        out.write(dump_yaml(redact([*control_plane, *hooks])))
        print(
            f"dry run: would apply {len(control_plane)} objects, wait for "
            f"{' and '.join('deployment/' + d for d in DEPLOYMENTS)} in {NAMESPACE}, then "
            "apply the MutatingWebhookConfiguration "
            f"(failurePolicy {opts.failure_policy}); private keys shown as {REDACTED}",
            file=err,
        )
        return 0

    out.write(_apply(opts, run, control_plane))
    for deployment in DEPLOYMENTS:
        _wait_for_rollout(opts, run, deployment, err)
    out.write(_apply(opts, run, hooks))
    print(
        f"sidemesh is installed (failurePolicy {opts.failure_policy}). Label a namespace with "
        f"`kubectl label namespace NAME {names.NAMESPACE_LABEL}=enabled` and restart its pods.",
        file=err,
    )
    return 0


def _wait_for_rollout(opts: Options, run: Runner, deployment: str, err: TextIO) -> None:
    """Step 4 for one Deployment; the webhook configuration waits for both (sidecars injected
    before discovery serves would start on its ``initial_fetch_timeout`` with no config)."""
    print(f"waiting up to {opts.timeout_seconds}s for deployment/{deployment} …", file=err)
    done = run(
        opts.kubectl_argv(
            f"-n {NAMESPACE} rollout status deployment/{deployment} "
            f"--timeout={opts.timeout_seconds}s"
        )
    )
    if done.returncode != 0:
        raise InstallError(
            f"deployment/{deployment} did not become ready: {done.stderr.strip()}\n"
            f"The MutatingWebhookConfiguration was NOT applied, so pod creation is unaffected "
            f"(on a first install no webhook exists; on an upgrade the previous servers keep "
            f"answering, as a rollout never takes a ready replica away). Look at "
            f"`kubectl -n {NAMESPACE} get pods` and `kubectl -n {NAMESPACE} logs "
            f"deploy/{deployment}`, then run `sidemesh install` again."
        )


#: Pause after deleting the webhook configuration: every API server drops it from its informer
#: cache within moments, and until then it may still call the (soon gone) servers.
SETTLE_SECONDS = 3.0


def uninstall(
    opts: Options,
    *,
    run: Runner = run_subprocess,
    out: TextIO,
    err: TextIO,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """``sidemesh uninstall``: the webhook configuration first, then the rest."""
    steps = [
        opts.kubectl_argv(
            f"delete mutatingwebhookconfiguration {names.WEBHOOK_CONFIGURATION} --ignore-not-found"
        ),
        opts.kubectl_argv(
            f"delete namespace {NAMESPACE} --ignore-not-found --timeout={opts.timeout_seconds}s"
        ),
        opts.kubectl_argv(f"delete {' '.join(CLUSTER_RBAC)} --ignore-not-found"),
    ]
    if opts.dry_run:
        for argv in steps:
            out.write(" ".join(argv) + "\n")
        return 0
    for i, argv in enumerate(steps):
        done = run(argv)
        out.write(done.stdout)
        if done.returncode != 0:
            state = (
                "Nothing was removed: the webhook is still active."
                if i == 0
                else "The webhook configuration is already gone, so pod creation is not "
                "affected; run `sidemesh uninstall` again to remove the rest."
            )
            raise InstallError(f"{' '.join(argv)} failed: {done.stderr.strip()}\n{state}")
        if i == 0:
            sleep(SETTLE_SECONDS)
    print(
        f"sidemesh is removed. Pods injected earlier keep their sidecars until they are "
        f"re-created, and their certificates are no longer renewed: remove the "
        f"{names.NAMESPACE_LABEL} label from their namespaces (`kubectl get namespace -l "
        f"{names.NAMESPACE_LABEL}=enabled`) and restart them.",
        file=err,
    )
    return 0
