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
4. **Wait for the rollout**, and only then
5. **apply the MutatingWebhookConfiguration.** With ``failurePolicy: Fail`` a webhook that
   points at no ready server would refuse pod creation in every meshed namespace; applying it
   last means a failed install leaves pod creation untouched.

Uninstall removes the MutatingWebhookConfiguration *first* and stops if that fails, so pod
creation can never be blocked by a webhook whose server is already gone; then the control-plane
namespace and the cluster-scoped RBAC.

Every cluster command goes through a :class:`Runner` (argv + stdin → :class:`Completed`), the seam
tests use to check the order of commands without a cluster. Rendering always runs the real
``kubectl kustomize``.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from webhook import names
from webhook.ca.authority import (
    CA_CERT,
    CA_KEY,
    TLS_CERT,
    TLS_KEY,
    CertificateAuthority,
    fingerprint_sha256,
    serving_cert_needs_renewal,
)
from webhook.config import DEFAULT_IMAGE, load_config
from webhook.errors import PKIError, SidemeshError

__all__ = [
    "CA_SECRET",
    "MANIFESTS",
    "REDACTED",
    "SERVICE_DNS_NAMES",
    "SETTLE_SECONDS",
    "TLS_SECRET",
    "Completed",
    "InstallError",
    "Options",
    "Pki",
    "Runner",
    "install",
    "kustomize_build",
    "plan_pki",
    "redact",
    "render",
    "run_subprocess",
    "secrets",
    "uninstall",
    "with_ca_bundle",
]

#: The kustomize base, next to the package in a source checkout.
MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
CA_SECRET = "sidemesh-ca"
TLS_SECRET = "sidemesh-tls"
NAMESPACE = names.CONTROL_PLANE_NAMESPACE
DEPLOYMENT = names.SERVICE_NAME
#: Cluster-scoped RBAC objects (both named like the Service).
CLUSTER_RBAC = (f"clusterrolebinding/{names.SERVICE_NAME}", f"clusterrole/{names.SERVICE_NAME}")
FIELD_MANAGER = "sidemesh-install"
#: Replaces private keys in ``--dry-run`` output. Not base64, so the output cannot be applied.
REDACTED = "<redacted>"
_PRIVATE_KEYS = (CA_KEY, TLS_KEY)
_LABELS = {
    "app.kubernetes.io/part-of": "sidemesh",
    "app.kubernetes.io/managed-by": FIELD_MANAGER,
}
_SVC = f"{names.SERVICE_NAME}.{names.CONTROL_PLANE_NAMESPACE}"
#: The names the API server and the proxies use to reach the Service.
SERVICE_DNS_NAMES: tuple[str, ...] = (
    names.SERVICE_NAME,
    _SVC,
    f"{_SVC}.svc",
    f"{_SVC}.svc.cluster.local",
)

FailurePolicy = Literal["Fail", "Ignore"]


class InstallError(SidemeshError):
    """The install or uninstall cannot go on; the message says what state the cluster is in."""


# --- the runner seam -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Completed:
    """What a command did: exit code and its two output streams."""

    returncode: int
    stdout: str = ""
    stderr: str = ""


class Runner(Protocol):
    """Runs one command (``argv[0]`` is the program) with ``stdin`` as its input."""

    def __call__(self, argv: Sequence[str], stdin: str | None = None) -> Completed: ...


def run_subprocess(argv: Sequence[str], stdin: str | None = None) -> Completed:
    """The real runner. A missing program is an :class:`InstallError`, not a traceback."""
    try:
        proc = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, check=False, timeout=900
        )
    except FileNotFoundError:
        raise InstallError(
            f"{argv[0]} not found on PATH (sidemesh drives the cluster through it)"
        ) from None
    except subprocess.TimeoutExpired:
        raise InstallError(f"{' '.join(argv[:4])} … did not finish in 15 minutes") from None
    return Completed(proc.returncode, proc.stdout, proc.stderr)


# --- options ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """What ``sidemesh install`` / ``uninstall`` were asked to do."""

    cert_dir: Path = Path("certs")
    manifests: Path = MANIFESTS
    image: str | None = None
    failure_policy: FailurePolicy = "Fail"
    context: str | None = None
    dry_run: bool = False
    timeout_seconds: int = 180
    kubectl: str = "kubectl"

    def kubectl_argv(self, command: str) -> list[str]:
        """A cluster command: kubectl, the context when one was chosen, then ``command``'s
        words (sidemesh's names contain no spaces)."""
        ctx = ["--context", self.context] if self.context else []
        return [self.kubectl, *ctx, *command.split()]


# --- rendering (real kustomize) ---------------------------------------------------------------


def kustomize_build(directory: Path, *, kubectl: str = "kubectl") -> list[dict[str, Any]]:
    """``kubectl kustomize DIRECTORY`` parsed into objects (the build contacts no cluster)."""
    done = run_subprocess([kubectl, "kustomize", str(directory)])
    if done.returncode != 0:
        raise InstallError(f"kustomize build of {directory} failed: {done.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def render(
    manifests: Path,
    *,
    image: str | None = None,
    failure_policy: FailurePolicy = "Fail",
    kubectl: str = "kubectl",
) -> list[dict[str, Any]]:
    """The control plane as kustomize builds it from a throwaway overlay of ``manifests``.

    ``image`` replaces the sidemesh image everywhere: the Deployment (kustomize ``images``) and
    the proxy and init images in the mesh config (a merged ``configMapGenerator``, which also
    gives the ConfigMap a new hash so the servers roll). ``Ignore`` adds the
    ``components/failure-policy-ignore`` component.
    """
    manifests = manifests.resolve()
    if not (manifests / "kustomization.yaml").is_file():
        raise InstallError(
            f"no kustomization.yaml in {manifests}: run from a sidemesh checkout or pass "
            "--manifests DIR"
        )
    with tempfile.TemporaryDirectory(prefix="sidemesh-overlay-") as tmp:
        overlay: dict[str, Any] = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            # kustomize refuses absolute paths here; a relative one reaches anywhere.
            "resources": [os.path.relpath(manifests, tmp)],
        }
        if failure_policy == "Ignore":
            component = manifests / "components" / "failure-policy-ignore"
            overlay["components"] = [os.path.relpath(component, tmp)]
        elif failure_policy != "Fail":
            raise InstallError(f"failure policy must be Fail or Ignore, not {failure_policy!r}")
        if image:
            overlay["images"] = [_image_override(image)]
            (Path(tmp) / "config.yaml").write_text(
                _config_with_image(manifests / "config.yaml", image), encoding="utf-8"
            )
            overlay["configMapGenerator"] = [
                {
                    "name": "sidemesh-config",
                    "namespace": NAMESPACE,
                    "behavior": "merge",
                    "files": ["config.yaml"],
                }
            ]
        (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump(overlay), encoding="utf-8")
        return kustomize_build(Path(tmp), kubectl=kubectl)


def _image_override(image: str) -> dict[str, str]:
    """A kustomize ``images`` entry that turns the default image into ``image``."""
    base_name = DEFAULT_IMAGE.rsplit(":", 1)[0]
    if "@" in image:
        name, digest = image.split("@", 1)
        return {"name": base_name, "newName": name, "digest": digest}
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:  # a tag, not a registry port
        return {"name": base_name, "newName": image[:colon], "newTag": image[colon + 1 :]}
    return {"name": base_name, "newName": image, "newTag": "latest"}


def _config_with_image(path: Path, image: str) -> str:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    proxy = dict(data.get("proxy") or {})
    proxy["image"] = image
    proxy["init_image"] = image
    data["proxy"] = proxy
    load_config(data)  # a bad image string fails here, not in every injected pod
    return yaml.safe_dump(data, sort_keys=False)


def with_ca_bundle(objects: Iterable[dict[str, Any]], root_pem: str) -> list[dict[str, Any]]:
    """Copies of ``objects`` whose MutatingWebhookConfigurations trust ``root_pem``."""
    bundle = base64.b64encode(root_pem.encode()).decode()
    out = []
    for obj in objects:
        obj = copy.deepcopy(obj)
        if obj.get("kind") == "MutatingWebhookConfiguration":
            for hook in obj.get("webhooks") or []:
                hook.setdefault("clientConfig", {})["caBundle"] = bundle
        out.append(obj)
    return out


# --- PKI ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """The certificates and keys to install, and where each came from (said to the user)."""

    ca: CertificateAuthority
    root_key_pem: str | None  # None only for a dry run's throwaway root
    serving_cert_pem: str
    serving_key_pem: str
    notes: tuple[str, ...] = field(default=())


def plan_pki(
    *,
    cert_dir: Path,
    cluster: Mapping[str, Mapping[str, bytes]],
    now: datetime,
    serving_ttl: timedelta,
    dry_run: bool,
) -> Pki:
    """Decide which root and serving certificate to install (module docstring, step 1).

    ``cluster`` maps Secret names to their decoded data, as found in the cluster (empty for a
    first install or a dry run). Writes to ``cert_dir`` only when it creates a root, and never
    in a dry run.
    """
    notes: list[str] = []
    local_exists = (cert_dir / CA_CERT).exists() or (cert_dir / CA_KEY).exists()
    in_cluster = cluster.get(CA_SECRET) or {}
    root_key_pem: str | None
    if in_cluster:
        ca = _ca_from_secret(in_cluster)
        root_key_pem = in_cluster[CA_KEY].decode()
        fp = fingerprint_sha256(ca.cert)
        if local_exists:
            local = CertificateAuthority.load(cert_dir)
            if local.cert != ca.cert:
                raise InstallError(
                    f"the cluster's mesh root (Secret {NAMESPACE}/{CA_SECRET}, SHA-256 {fp}) "
                    f"differs from the one in {cert_dir} "
                    f"(SHA-256 {fingerprint_sha256(local.cert)}). Installing would replace the "
                    "root and break mTLS between every injected pod and its peers; nothing was "
                    f"changed. Keep the cluster's root (move {cert_dir}/{CA_CERT} and {CA_KEY} "
                    "away, or point --cert-dir elsewhere), or run `sidemesh uninstall` first."
                )
        notes.append(f"root: reusing the cluster's (Secret {NAMESPACE}/{CA_SECRET}, {fp})")
    elif local_exists:
        ca = CertificateAuthority.load(cert_dir)
        root_key_pem = (cert_dir / CA_KEY).read_text(encoding="ascii")
        notes.append(f"root: reusing {cert_dir}/{CA_CERT} ({fingerprint_sha256(ca.cert)})")
    else:
        ca = CertificateAuthority.create(now=now)
        if dry_run:
            root_key_pem = None
            notes.append(
                f"root: none in {cert_dir}; a real install would create one there "
                "(this dry run uses a throwaway root)"
            )
        else:
            ca.save(cert_dir)
            root_key_pem = (cert_dir / CA_KEY).read_text(encoding="ascii")
            notes.append(
                f"root: created {cert_dir}/{CA_CERT} and {CA_KEY} (mode 0600; keep the key "
                f"safe, it signs every workload identity) — {fingerprint_sha256(ca.cert)}"
            )

    serving = cluster.get(TLS_SECRET) or {}
    current_cert = serving.get(TLS_CERT)
    if (
        current_cert
        and serving.get(TLS_KEY)
        and not serving_cert_needs_renewal(current_cert, ca, now=now)
        and _names_service(current_cert)
    ):
        cert_pem, key_pem = current_cert.decode(), serving[TLS_KEY].decode()
        notes.append(f"serving certificate: reusing Secret {NAMESPACE}/{TLS_SECRET}")
    else:
        cert_pem, key_pem = ca.issue_serving(SERVICE_DNS_NAMES, (), now=now, ttl=serving_ttl)
        expires = x509.load_pem_x509_certificate(cert_pem.encode()).not_valid_after_utc
        notes.append(
            f"serving certificate: issued for {_SVC}.svc, valid until {expires:%Y-%m-%d} "
            f"(run `sidemesh install` again before then; it renews in the last third)"
        )
    return Pki(ca, root_key_pem, cert_pem, key_pem, tuple(notes))


def _ca_from_secret(data: Mapping[str, bytes]) -> CertificateAuthority:
    try:
        cert = x509.load_pem_x509_certificate(data[CA_CERT])
        key = serialization.load_pem_private_key(data[CA_KEY], password=None)
    except (KeyError, ValueError) as exc:
        raise PKIError(
            f"Secret {NAMESPACE}/{CA_SECRET} does not hold a usable {CA_CERT} and {CA_KEY} "
            f"({type(exc).__name__}); fix or delete it before installing"
        ) from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if not isinstance(key, ec.EllipticCurvePrivateKey) or (
        key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki)
    ):
        raise PKIError(f"Secret {NAMESPACE}/{CA_SECRET}: {CA_KEY} does not belong to {CA_CERT}")
    return CertificateAuthority(cert=cert, key=key)


def _names_service(cert_pem: bytes) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return False
    return set(SERVICE_DNS_NAMES) <= set(san.get_values_for_type(x509.DNSName))


def secrets(pki: Pki) -> list[dict[str, Any]]:
    """The two Secrets the Deployment mounts. A dry run's throwaway root key shows redacted."""

    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    def secret(name: str, kind: str, data: dict[str, str]) -> dict[str, Any]:
        meta = {"name": name, "namespace": NAMESPACE, "labels": dict(_LABELS)}
        return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": kind, "data": data}

    root_key = b64(pki.root_key_pem) if pki.root_key_pem is not None else REDACTED
    return [
        secret(CA_SECRET, "Opaque", {CA_CERT: b64(pki.ca.root_pem), CA_KEY: root_key}),
        secret(
            TLS_SECRET,
            "kubernetes.io/tls",
            {TLS_CERT: b64(pki.serving_cert_pem), TLS_KEY: b64(pki.serving_key_pem)},
        ),
    ]


def redact(objects: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``objects`` with every private key in a Secret replaced by :data:`REDACTED`.

    Certificates stay: they are public, and a reader of a dry run may want to inspect them."""
    out = []
    for obj in objects:
        obj = copy.deepcopy(obj)
        if obj.get("kind") == "Secret":
            data = obj.get("data") or {}
            for key in data:
                if key in _PRIVATE_KEYS or key.endswith(".key"):
                    data[key] = REDACTED
        out.append(obj)
    return out


# --- install / uninstall -----------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Block style (``|``) for multi-line strings, so the dry run's mesh config stays readable."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _dump(objects: Sequence[dict[str, Any]]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False)


def _is_webhook_config(obj: Mapping[str, Any]) -> bool:
    return obj.get("kind") == "MutatingWebhookConfiguration"


def _cluster_secrets(opts: Options, run: Runner) -> dict[str, dict[str, bytes]]:
    """The install's two Secrets as they are in the cluster now (decoded; never printed)."""
    done = run(
        opts.kubectl_argv(
            f"-n {NAMESPACE} get secret {CA_SECRET} {TLS_SECRET} -o json --ignore-not-found"
        )
    )
    if done.returncode != 0:
        raise InstallError(
            f"cannot read the existing sidemesh Secrets (is the cluster reachable?): "
            f"{done.stderr.strip()}"
        )
    if not done.stdout.strip():
        return {}
    doc = json.loads(done.stdout)
    items = doc.get("items", []) if doc.get("kind") == "List" else [doc]
    return {
        item["metadata"]["name"]: {
            k: base64.b64decode(v) for k, v in (item.get("data") or {}).items()
        }
        for item in items
    }


def _apply(opts: Options, run: Runner, objects: Sequence[dict[str, Any]]) -> str:
    done = run(
        opts.kubectl_argv(
            f"apply --server-side --field-manager={FIELD_MANAGER} --force-conflicts -f -"
        ),
        _dump(objects),
    )
    if done.returncode != 0:
        raise InstallError(f"kubectl apply failed: {done.stderr.strip()}")
    return done.stdout


def install(
    opts: Options,
    *,
    run: Runner = run_subprocess,
    now: Callable[[], datetime],
    out: TextIO,
    err: TextIO,
) -> int:
    """``sidemesh install`` (module docstring). Returns the exit code."""
    config = load_config(yaml.safe_load((opts.manifests / "config.yaml").read_text("utf-8")))
    serving_ttl = timedelta(seconds=config.ca.serving_cert_ttl_seconds)
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
        cluster = _cluster_secrets(opts, run)
    pki = plan_pki(
        cert_dir=opts.cert_dir,
        cluster=cluster,
        now=now(),
        serving_ttl=serving_ttl,
        dry_run=opts.dry_run,
    )
    for note in pki.notes:
        print(note, file=err)
    objects = with_ca_bundle(rendered, pki.ca.root_pem)
    # Namespace first (the Secrets live in it), then the Secrets, so the first server pods
    # find their certificates; the webhook configuration strictly last.
    head = [o for o in objects if o.get("kind") == "Namespace"]
    body = [o for o in objects if o.get("kind") != "Namespace" and not _is_webhook_config(o)]
    hooks = [o for o in objects if _is_webhook_config(o)]
    control_plane = [*head, *secrets(pki), *body]

    if opts.dry_run:
        out.write(_dump(redact([*control_plane, *hooks])))
        print(
            f"dry run: would apply {len(control_plane)} objects, wait for deployment/"
            f"{DEPLOYMENT} in {NAMESPACE}, then apply the MutatingWebhookConfiguration "
            f"(failurePolicy {opts.failure_policy}); private keys shown as {REDACTED}",
            file=err,
        )
        return 0

    out.write(_apply(opts, run, control_plane))
    print(f"waiting up to {opts.timeout_seconds}s for deployment/{DEPLOYMENT} …", file=err)
    done = run(
        opts.kubectl_argv(
            f"-n {NAMESPACE} rollout status deployment/{DEPLOYMENT} "
            f"--timeout={opts.timeout_seconds}s"
        )
    )
    if done.returncode != 0:
        raise InstallError(
            f"deployment/{DEPLOYMENT} did not become ready: {done.stderr.strip()}\n"
            f"The MutatingWebhookConfiguration was NOT applied, so pod creation is unaffected "
            f"(on a first install no webhook exists; on an upgrade the previous servers keep "
            f"answering, as a rollout never takes a ready replica away). Look at "
            f"`kubectl -n {NAMESPACE} get pods` and `kubectl -n {NAMESPACE} logs "
            f"deploy/{DEPLOYMENT}`, then run `sidemesh install` again."
        )
    out.write(_apply(opts, run, hooks))
    print(
        f"sidemesh is installed (failurePolicy {opts.failure_policy}). Label a namespace with "
        f"`kubectl label namespace NAME {names.NAMESPACE_LABEL}=enabled` and restart its pods.",
        file=err,
    )
    return 0


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
