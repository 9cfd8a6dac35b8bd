"""`sidemesh install` / `uninstall`: what reaches the cluster, in which order, and what never
reaches the terminal.

There is no API server here. kubectl commands go through the install's runner seam: a recording
stand-in answers them like kubectl would. The Secrets already in the cluster are read through
sidemesh's Kubernetes client from the kube-apiserver STAND-IN (tests/support/apiserver_standin.py).
Rendering is always the real ``kubectl kustomize``, and certificates are checked with the real
``openssl verify``.
"""

from __future__ import annotations

import base64
import io
import os
import stat
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from kubernetes_validate.utils import latest_version

from tests.conftest import REPO, require_tools
from tests.support.apiserver_standin import APIServerStandin
from tests.support.jwks_issuer import Issuer
from tests.support.pki import openssl_verify_result
from webhook import names
from webhook.ca.authority import CertificateAuthority
from webhook.ca.serving import ensure_dev_pki
from webhook.errors import PKIError
from webhook.install.cluster import SETTLE_SECONDS, Options, install, uninstall
from webhook.install.pki import (
    CA_SECRET,
    DISCOVERY_TLS_SECRET,
    RATELIMIT_TLS_SECRET,
    REDACTED,
    TLS_SECRET,
)
from webhook.install.render import render
from webhook.install.runner import Completed, InstallError

# Now, not a fixed date: `openssl verify` checks validity against the real clock.
T0 = datetime.now(UTC)
SERVICE_HOST = f"{names.SERVICE_NAME}.{names.CONTROL_PLANE_NAMESPACE}.svc"

Obj = dict[str, Any]


@pytest.fixture(autouse=True)
def _kubectl() -> None:
    require_tools("kubectl", "openssl")


@pytest.fixture
def cluster(issuer: Issuer, tmp_path: Path) -> Iterator[APIServerStandin]:
    """The API server install reads the mesh's Secrets from (none at first)."""
    allowed = (
        (names.CONTROL_PLANE_NAMESPACE, CA_SECRET),
        (names.CONTROL_PLANE_NAMESPACE, TLS_SECRET),
        (names.CONTROL_PLANE_NAMESPACE, DISCOVERY_TLS_SECRET),
        (names.CONTROL_PLANE_NAMESPACE, RATELIMIT_TLS_SECRET),
    )
    with APIServerStandin(tmp_path / "standin", issuer, allowed_secrets=allowed) as api:
        yield api


def holding(cluster: APIServerStandin, secrets: list[Obj]) -> APIServerStandin:
    """``cluster`` with ``secrets`` (as applied by an earlier install) stored in it."""
    for obj in secrets:
        decoded = {k: base64.b64decode(v) for k, v in obj["data"].items()}
        cluster.add_secret(obj["metadata"]["name"], decoded)
    return cluster


@dataclass
class FakeKubectl:
    """Answers cluster commands like kubectl would, and records them with their stdin."""

    rollout_rc: int = 0
    failing: str | None = None  # a word: any command containing it fails
    calls: list[tuple[list[str], str | None]] = field(default_factory=list)

    def __call__(self, argv: Sequence[str], stdin: str | None = None) -> Completed:
        argv = list(argv)
        self.calls.append((argv, stdin))
        if self.failing and self.failing in argv:
            return Completed(1, "", f"error: {self.failing} is forbidden")
        if "rollout" in argv:
            return Completed(self.rollout_rc, "", "" if self.rollout_rc == 0 else "timed out")
        if "apply" in argv:
            assert stdin is not None
            applied = [d for d in yaml.safe_load_all(stdin) if d]
            lines = [
                f"{o['kind'].lower()}/{o['metadata']['name']} serverside-applied" for o in applied
            ]
            return Completed(0, "\n".join(lines) + "\n")
        return Completed(0, "deleted\n")

    def verbs(self) -> list[str]:
        """The kind of each command, in order: apply, rollout or delete."""
        kinds = ("apply", "rollout", "delete")
        return [next(w for w in argv if w in kinds) for argv, _ in self.calls]

    def applied(self) -> list[list[Obj]]:
        return [
            [d for d in yaml.safe_load_all(stdin or "") if d]
            for argv, stdin in self.calls
            if "apply" in argv
        ]


def run_install(
    tmp_path: Path,
    fake: FakeKubectl,
    cluster: APIServerStandin,
    *,
    now: datetime = T0,
    **kw: Any,
) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    opts = Options(cert_dir=kw.pop("cert_dir", tmp_path / "certs"), **kw)
    code = install(opts, run=fake, kube=cluster.client, now=lambda: now, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def secret_data(objects: list[Obj], name: str) -> dict[str, bytes]:
    secret = next(o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == name)
    return {k: base64.b64decode(v) for k, v in secret["data"].items()}


def ca_bundle(objects: list[Obj]) -> bytes:
    hooks = next(o for o in objects if o["kind"] == "MutatingWebhookConfiguration")["webhooks"]
    bundles = {h["clientConfig"]["caBundle"] for h in hooks}
    assert len(bundles) == 1, "both webhooks trust the same root"
    return base64.b64decode(bundles.pop())


def openssl_verify(
    tmp_path: Path, root_pem: bytes, cert_pem: bytes, host: str = SERVICE_HOST
) -> subprocess.CompletedProcess[str]:
    """What a client dialling ``host`` gets from ``openssl verify``."""
    return openssl_verify_result(tmp_path, root_pem, cert_pem, purpose="sslserver", hostname=host)


# --- install -----------------------------------------------------------------------------------


def test_install_applies_the_control_plane_waits_then_applies_the_webhook(
    tmp_path: Path, cluster: APIServerStandin
) -> None:
    fake = FakeKubectl()
    code, out, _ = run_install(tmp_path, fake, cluster)
    assert code == 0
    assert fake.verbs() == ["apply", "rollout", "rollout", "apply"]
    rollouts = [argv[-2] for argv, _ in fake.calls if "rollout" in argv]
    assert rollouts == ["deployment/sidemesh", "deployment/sidemesh-discovery"]
    assert [(r.method, r.path.rsplit("/", 1)[1]) for r in cluster.requests] == [
        ("GET", CA_SECRET),
        ("GET", TLS_SECRET),
        ("GET", DISCOVERY_TLS_SECRET),
        ("GET", RATELIMIT_TLS_SECRET),
    ]
    control_plane, hooks = fake.applied()
    assert [o["kind"] for o in control_plane][:5] == ["Namespace", *["Secret"] * 4]
    assert "MutatingWebhookConfiguration" not in [o["kind"] for o in control_plane]
    assert [o["kind"] for o in hooks] == ["MutatingWebhookConfiguration"]
    # Server-side apply: no last-applied-configuration annotation copying the keys.
    for argv, _ in fake.calls:
        if "apply" in argv:
            assert "--server-side" in argv and argv[-2:] == ["-f", "-"]
    for obj in control_plane + hooks:
        kubernetes_validate.validate(obj, latest_version(), strict=True)
    assert "serverside-applied" in out


def test_install_creates_the_root_once_and_ships_it_in_the_secret(
    tmp_path: Path, cluster: APIServerStandin
) -> None:
    fake = FakeKubectl()
    run_install(tmp_path, fake, cluster)
    certs = tmp_path / "certs"
    assert stat.S_IMODE((certs / "ca.key").stat().st_mode) == 0o600
    control_plane, hooks = fake.applied()
    ca = secret_data(control_plane, CA_SECRET)
    assert ca["ca.crt"] == (certs / "ca.crt").read_bytes() == ca_bundle(hooks)
    assert ca["ca.key"] == (certs / "ca.key").read_bytes()
    tls = secret_data(control_plane, TLS_SECRET)
    done = openssl_verify(tmp_path, ca_bundle(hooks), tls["tls.crt"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert (certs / "tls.crt").exists() is False, "the cluster's serving cert is not kept locally"
    # The xDS server's certificate: same root, the discovery Service's names, and the control
    # plane's SPIFFE id, which sidecars check.
    xds = secret_data(control_plane, DISCOVERY_TLS_SECRET)
    xds_host = "sidemesh-discovery.sidemesh-system.svc"
    done = openssl_verify(tmp_path, ca_bundle(hooks), xds["tls.crt"], xds_host)
    assert done.returncode == 0, done.stdout + done.stderr
    san = (
        x509.load_pem_x509_certificate(xds["tls.crt"])
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/ns/sidemesh-system/sa/sidemesh-discovery"
    ]
    # The rate-limit service's: its Service's names and its service account's SPIFFE id.
    rls = secret_data(control_plane, RATELIMIT_TLS_SECRET)
    rls_host = "sidemesh-ratelimit.sidemesh-system.svc"
    done = openssl_verify(tmp_path, ca_bundle(hooks), rls["tls.crt"], rls_host)
    assert done.returncode == 0, done.stdout + done.stderr
    rls_san = (
        x509.load_pem_x509_certificate(rls["tls.crt"])
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert rls_san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/ns/sidemesh-system/sa/sidemesh-ratelimit"
    ]


def test_no_private_key_is_ever_printed(
    tmp_path: Path, cluster: APIServerStandin, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeKubectl()
    _, out, err = run_install(tmp_path, fake, cluster)
    control_plane, _ = fake.applied()
    keys = [
        secret_data(control_plane, CA_SECRET)["ca.key"],
        secret_data(control_plane, TLS_SECRET)["tls.key"],
        secret_data(control_plane, DISCOVERY_TLS_SECRET)["tls.key"],
        secret_data(control_plane, RATELIMIT_TLS_SECRET)["tls.key"],
    ]
    captured = capsys.readouterr()
    for text in (out, err, captured.out, captured.err):
        assert "PRIVATE KEY" not in text
        for key in keys:
            assert base64.b64encode(key).decode()[:40] not in text


def test_reinstall_reuses_the_clusters_root_and_serving_cert(
    tmp_path: Path, cluster: APIServerStandin
) -> None:
    first = FakeKubectl()
    run_install(tmp_path, first, cluster)
    installed = [o for o in first.applied()[0] if o["kind"] == "Secret"]
    # An upgrade from another checkout: an empty cert dir, the cluster holds the PKI.
    second = FakeKubectl()
    holding(cluster, installed)
    elsewhere = tmp_path / "elsewhere"
    code, _, err = run_install(
        tmp_path, second, cluster, cert_dir=elsewhere, now=T0 + timedelta(days=10)
    )
    assert code == 0
    assert not elsewhere.exists(), "the cluster's root key is not copied to the laptop"
    assert ca_bundle(second.applied()[1]) == ca_bundle(first.applied()[1])
    for name in (CA_SECRET, TLS_SECRET, DISCOVERY_TLS_SECRET, RATELIMIT_TLS_SECRET):
        assert secret_data(second.applied()[0], name) == secret_data(first.applied()[0], name)
    assert "reusing the cluster's" in err


def test_serving_cert_in_its_last_third_is_renewed_under_the_same_root(
    tmp_path: Path, cluster: APIServerStandin
) -> None:
    first = FakeKubectl()
    run_install(tmp_path, first, cluster)
    installed = [o for o in first.applied()[0] if o["kind"] == "Secret"]
    later = FakeKubectl()
    holding(cluster, installed)
    run_install(
        tmp_path, later, cluster, now=T0 + timedelta(days=70)
    )  # 90-day cert: renew after 60
    old = secret_data(first.applied()[0], TLS_SECRET)["tls.crt"]
    new = secret_data(later.applied()[0], TLS_SECRET)["tls.crt"]
    assert new != old
    assert ca_bundle(later.applied()[1]) == ca_bundle(first.applied()[1])


def test_refuses_to_replace_a_different_root_in_the_cluster(
    tmp_path: Path, cluster: APIServerStandin
) -> None:
    first = FakeKubectl()
    run_install(tmp_path, first, cluster, cert_dir=tmp_path / "a")
    installed = [o for o in first.applied()[0] if o["kind"] == "Secret"]
    CertificateAuthority.create(now=T0).save(tmp_path / "b")  # another root on this laptop
    fake = FakeKubectl()
    holding(cluster, installed)
    with pytest.raises(InstallError, match="break mTLS"):
        run_install(tmp_path, fake, cluster, cert_dir=tmp_path / "b")
    assert fake.calls == [], "nothing was applied"


def test_standin_unreadable_cluster_secrets_stop_the_install_before_any_change(
    tmp_path: Path, issuer: Issuer
) -> None:
    fake = FakeKubectl()
    # RBAC that lets the caller read the serving Secret only: the root's Secret is forbidden.
    expected = pytest.raises(InstallError, match="cannot read the existing sidemesh Secrets")
    with APIServerStandin(tmp_path / "rbac", issuer) as api, expected as err:
        run_install(tmp_path, fake, api)
    assert "403" in str(err.value) and fake.calls == []
    assert not (tmp_path / "certs").exists(), "no root is created for a cluster we cannot read"


def test_standin_a_root_secret_whose_key_is_not_its_roots_stops_the_install(
    tmp_path: Path, cluster: APIServerStandin
) -> None:
    one, other = CertificateAuthority.create(now=T0), CertificateAuthority.create(now=T0)
    other.save(tmp_path / "other")
    key = (tmp_path / "other" / "ca.key").read_bytes()
    cluster.add_secret(CA_SECRET, {"ca.crt": one.root_pem.encode(), "ca.key": key})
    fake = FakeKubectl()
    wrong_key = r"Secret sidemesh-system/sidemesh-ca/ca\.key does not belong"
    with pytest.raises(PKIError, match=wrong_key):
        run_install(tmp_path, fake, cluster)
    assert fake.calls == [] and not (tmp_path / "certs").exists()


def test_a_failed_rollout_never_applies_the_webhook(
    tmp_path: Path, cluster: APIServerStandin
) -> None:
    fake = FakeKubectl(rollout_rc=1)
    with pytest.raises(InstallError, match="NOT applied, so pod creation is unaffected"):
        run_install(tmp_path, fake, cluster)
    assert fake.verbs() == ["apply", "rollout"]
    assert all(o["kind"] != "MutatingWebhookConfiguration" for o in fake.applied()[0])


def test_context_goes_to_every_cluster_command(tmp_path: Path, cluster: APIServerStandin) -> None:
    fake = FakeKubectl()
    run_install(tmp_path, fake, cluster, context="kind-mesh")
    assert len(fake.calls) == 4
    for argv, _ in fake.calls:
        assert argv[:3] == ["kubectl", "--context", "kind-mesh"]


def test_image_and_failure_policy_flags_reach_every_role(
    tmp_path: Path, cluster: APIServerStandin
) -> None:
    image = "registry.example:5000/team/sidemesh:dev"
    fake = FakeKubectl()
    run_install(tmp_path, fake, cluster, image=image, failure_policy="Ignore")
    control_plane, hooks = fake.applied()
    deployment = next(o for o in control_plane if o["kind"] == "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == image
    config_map = next(o for o in control_plane if o["kind"] == "ConfigMap")
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    assert config["proxy"]["image"] == config["proxy"]["init_image"] == image
    # The ConfigMap's name carries its content hash and the Deployment follows it, so
    # changing the image (or any config) rolls the servers.
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": config_map["metadata"]["name"]}} in volumes
    default_name = next(o for o in render(REPO / "manifests") if o["kind"] == "ConfigMap")[
        "metadata"
    ]["name"]
    assert config_map["metadata"]["name"] != default_name
    assert [h["failurePolicy"] for h in hooks[0]["webhooks"]] == ["Ignore", "Ignore"]


# --- dry run, through the real command line ------------------------------------------------------


def sidemesh(*args: str, kubectl: Path | None = None) -> subprocess.CompletedProcess[str]:
    extra = ["--kubectl", str(kubectl)] if kubectl else []
    return subprocess.run(
        [sys.executable, "-m", "webhook", *args, *extra],
        capture_output=True, text=True, check=False, cwd=REPO,
    )  # fmt: skip


def logging_kubectl(tmp_path: Path) -> Path:
    """A kubectl stand-in on the real runner: `kustomize` runs the real kubectl, every other
    command is logged (argv, then stdin) and answered with nothing, like an empty cluster."""
    real = subprocess.check_output(["sh", "-c", "command -v kubectl"], text=True).strip()
    log = tmp_path / "kubectl.log"
    script = tmp_path / "kubectl"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = kustomize ]; then exec {real} "$@"; fi\n'
        f'echo "ARGV $*" >> {log}\n'
        f'case "$*" in *"-f -"*) cat > {tmp_path}/stdin.$$ ;; esac\n'
        "exit 0\n"
    )
    script.chmod(0o755)
    return script


def test_dry_run_renders_a_ca_bundle_that_verifies_the_serving_cert(tmp_path: Path) -> None:
    kubectl = logging_kubectl(tmp_path)
    certs = tmp_path / "certs"
    done = sidemesh("install", "--dry-run", "--cert-dir", str(certs), kubectl=kubectl)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "kubectl.log").exists(), "a dry run contacts no cluster"
    assert not certs.exists(), "a dry run writes no key"
    objects = [d for d in yaml.safe_load_all(done.stdout) if d]
    root = ca_bundle(objects)
    tls = next(o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == TLS_SECRET)[
        "data"
    ]
    ca = next(o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == CA_SECRET)[
        "data"
    ]
    assert tls["tls.key"] == ca["ca.key"] == REDACTED
    assert "PRIVATE KEY" not in done.stdout + done.stderr
    verified = openssl_verify(tmp_path, root, base64.b64decode(tls["tls.crt"]))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    # ... and the check can fail: another root does not verify it.
    other = CertificateAuthority.create(now=datetime.now(UTC)).root_pem.encode()
    assert openssl_verify(tmp_path, other, base64.b64decode(tls["tls.crt"])).returncode != 0


def test_dry_run_uses_an_existing_root_and_never_prints_its_key(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    ensure_dev_pki(certs, now=datetime.now(UTC))
    done = sidemesh("install", "--dry-run", "--cert-dir", str(certs))
    assert done.returncode == 0, done.stderr
    objects = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert ca_bundle(objects) == (certs / "ca.crt").read_bytes()
    key_b64 = base64.b64encode((certs / "ca.key").read_bytes()).decode()
    assert key_b64 not in done.stdout and "PRIVATE KEY" not in done.stdout + done.stderr


def test_standin_install_through_the_real_runner_and_kubeconfig(
    tmp_path: Path, cluster: APIServerStandin
) -> None:
    """The command line, the subprocess runner with a logging kubectl, and the Secrets read from
    the stand-in API server named by --kubeconfig and --context (as kubectl would use them)."""
    kubectl = logging_kubectl(tmp_path)
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig", context="c1")
    holding(cluster, [])
    done = sidemesh(
        "install", "--cert-dir", str(tmp_path / "certs"), "--kubeconfig", str(kubeconfig),
        "--context", "c1", kubectl=kubectl,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [r.method for r in cluster.requests] == ["GET"] * 4  # the Secrets: not found
    log = (tmp_path / "kubectl.log").read_text().splitlines()
    assert all(
        line.split()[1:5] == ["--kubeconfig", str(kubeconfig), "--context", "c1"] for line in log
    )
    assert [line.split()[5] for line in log] == ["apply", "-n", "-n", "apply"]
    assert "rollout status deployment/sidemesh " in log[1]
    assert "rollout status deployment/sidemesh-discovery " in log[2]
    stdins = sorted(tmp_path.glob("stdin.*"), key=os.path.getmtime)
    assert [len(list(yaml.safe_load_all(p.read_text()))) > 1 for p in stdins] == [True, False]
    assert "MutatingWebhookConfiguration" in stdins[1].read_text()


def test_missing_kubectl_is_a_clear_error(tmp_path: Path) -> None:
    done = sidemesh("install", "--dry-run", "--cert-dir", str(tmp_path), kubectl=tmp_path / "nope")
    assert done.returncode == 1
    assert "not found on PATH" in done.stderr and "Traceback" not in done.stderr


# --- uninstall ---------------------------------------------------------------------------------


def run_uninstall(fake: FakeKubectl, **kw: Any) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()

    def sleep(seconds: float) -> None:  # recorded in order with the commands
        fake.calls.append((["sleep", str(seconds)], None))

    code = uninstall(Options(**kw), run=fake, out=out, err=err, sleep=sleep)
    return code, err.getvalue()


def test_uninstall_removes_the_webhook_first() -> None:
    fake = FakeKubectl()
    code, err = run_uninstall(fake)
    assert code == 0
    commands = [" ".join(argv) for argv, _ in fake.calls]
    webhook = names.WEBHOOK_CONFIGURATION
    assert (
        commands[0] == f"kubectl delete mutatingwebhookconfiguration {webhook} --ignore-not-found"
    )
    # A pause, so no API server still calls the webhook when its servers go away.
    assert commands[1] == f"sleep {SETTLE_SECONDS}"
    assert "delete namespace sidemesh-system" in commands[2]
    assert "clusterrolebinding/sidemesh clusterrole/sidemesh" in commands[3]
    assert "keep their sidecars until they are re-created" in err


def test_uninstall_stops_when_the_webhook_cannot_be_removed() -> None:
    fake = FakeKubectl(failing="mutatingwebhookconfiguration")
    with pytest.raises(InstallError, match="Nothing was removed"):
        run_uninstall(fake)
    assert len(fake.calls) == 1, "the server is not taken away while its webhook is active"


def test_uninstall_dry_run_prints_the_commands_in_order() -> None:
    fake = FakeKubectl()
    out, err = io.StringIO(), io.StringIO()
    uninstall(Options(dry_run=True), run=fake, out=out, err=err)
    assert fake.calls == []
    assert out.getvalue().splitlines()[0].startswith("kubectl delete mutatingwebhookconfiguration")
