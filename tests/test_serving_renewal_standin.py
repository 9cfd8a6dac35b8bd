"""Serving-certificate renewal in a cluster, through Secret ``sidemesh-tls`` — against the local
kube-apiserver STAND-IN (tests/support/apiserver_standin.py), not a real API server: none
exists here.

In a cluster ``--cert-dir`` is the read-only projected Secret mount (docs/CONTRACTS.md,
section 5), so the upkeep cannot write ``tls.crt``/``tls.key`` there; it updates the Secret
instead and the kubelet swaps the mounted files. Each scenario runs ``sidemesh serve``'s upkeep
(``upkeep_from_config``, API access from a kubeconfig) in a child process whose cert dir really
is read-only: a read-only bind mount in a private mount namespace when we are root (root
ignores file modes), a mode-0555 directory otherwise.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import require_tools
from tests.support.apiserver_standin import APIServerStandin
from tests.support.jwks_issuer import Issuer
from tests.support.pki import openssl_verify
from tests.support.programs import PROGRAMS
from webhook.ca.authority import SERVICE_DNS_NAMES, CertificateAuthority
from webhook.ca.serving import write_serving_pair
from webhook.ca.upkeep import CAUpkeep
from webhook.config import MeshConfig
from webhook.kube.client import KubeAPIError

REPO = Path(__file__).resolve().parents[1]
NOW = datetime.now(UTC)
TLS = ("sidemesh-system", "sidemesh-tls")
#: The child: `sidemesh serve`'s upkeep, ROUNDS rounds, logging to stderr.
UPKEEP = str(PROGRAMS / "upkeep_rounds.py")

WARNING = "is due for renewal but the directory is read-only"


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(now=NOW - timedelta(days=400))


def serving_pair(ca: CertificateAuthority, *, age_days: int) -> tuple[str, str]:
    """A 90-day serving cert for the Service names, as `sidemesh install` issues it."""
    return ca.issue_serving(
        SERVICE_DNS_NAMES, (), now=NOW - timedelta(days=age_days), ttl=timedelta(days=90)
    )


def mounted_dir(path: Path, ca: CertificateAuthority, pair: tuple[str, str]) -> Path:
    """What the projected volume holds: ca.crt/ca.key and tls.crt/tls.key."""
    path.mkdir(parents=True)
    ca.save(path)
    write_serving_pair(path, *pair)
    return path


def with_standin(
    tmp: Path, issuer: Issuer, pair: tuple[str, str], *, rendezvous: int = 0
) -> APIServerStandin:
    api = APIServerStandin(tmp / "standin", issuer, secret_get_rendezvous=rendezvous).start()
    api.add_webhook_config("sidemesh-injector")
    api.add_secret("sidemesh-tls", {"tls.crt": pair[0].encode(), "tls.key": pair[1].encode()})
    return api


def start_upkeep(cert_dir: Path, kubeconfig: Path | None, rounds: int) -> subprocess.Popen[str]:
    """The upkeep in a child process that cannot write ``cert_dir``."""
    cmd = [sys.executable, UPKEEP, str(cert_dir), str(kubeconfig or ""), str(rounds)]
    if os.geteuid() == 0:
        require_tools("unshare", "mount")
        remount = 'mount --bind -o ro "$0" "$0" && exec "$@"'
        cmd = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", remount]
        cmd += [str(cert_dir), sys.executable, UPKEEP]
        cmd += [str(cert_dir), str(kubeconfig or ""), str(rounds)]
    else:
        cert_dir.chmod(0o555)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("KUBERNETES_") and "proxy" not in k.lower()
    }
    env["PYTHONPATH"] = str(REPO)
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out + err


def secret_requests(api: APIServerStandin) -> list[tuple[str, str]]:
    return [(r.method, r.path) for r in api.requests if "/secrets/" in r.path]


def dns_names(cert_pem: bytes) -> list[str]:
    cert = x509.load_pem_x509_certificate(cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName)


@pytest.fixture
def cleanup(tmp_path: Path) -> Iterator[list[Any]]:
    things: list[Any] = []
    yield things
    for thing in things:
        if isinstance(thing, APIServerStandin):
            thing.stop()
        else:
            thing.chmod(0o755)  # so tmp_path can be removed when not root
            shutil.rmtree(thing, ignore_errors=True)


# --- the scenarios --------------------------------------------------------------------------


def test_standin_due_cert_on_a_read_only_mount_is_renewed_in_the_secret(
    tmp_path: Path, issuer: Issuer, ca: CertificateAuthority, cleanup: list[Any]
) -> None:
    old = serving_pair(ca, age_days=70)  # 20 of 90 days left: in its last third
    api = with_standin(tmp_path, issuer, old)
    certs = mounted_dir(tmp_path / "certs", ca, old)
    cleanup += [api, certs]
    # Two rounds: the second finds the Secret fresh although the mount still has the old pair
    # (the kubelet has not synced yet), so it must not write again.
    log = finish(start_upkeep(certs, api.kubeconfig(tmp_path / "kubeconfig"), rounds=2))

    data = api.secret_data("sidemesh-tls")
    assert data["tls.crt"] != old[0].encode()
    assert api.secrets[TLS]["metadata"]["resourceVersion"] == "2"  # exactly one write
    assert api.secrets[TLS]["type"] == "kubernetes.io/tls"
    openssl_verify(tmp_path, ca.root_pem, data["tls.crt"].decode(), purpose="sslserver")
    assert sorted(dns_names(data["tls.crt"])) == sorted(SERVICE_DNS_NAMES)
    key = serialization.load_pem_private_key(data["tls.key"], None)
    assert key.public_key() == x509.load_pem_x509_certificate(data["tls.crt"]).public_key()
    new_cert = x509.load_pem_x509_certificate(data["tls.crt"])
    assert new_cert.not_valid_after_utc > NOW + timedelta(days=60)
    # The mount was not written (it cannot be), and the key went nowhere but the Secret.
    assert (certs / "tls.crt").read_text() == old[0] and not (certs / ".renew.lock").exists()
    assert "renewed the serving certificate in Secret sidemesh-system/sidemesh-tls" in log
    assert "PRIVATE KEY" not in log and "renewal failed" not in log and WARNING not in log
    assert [m for m, _ in secret_requests(api)] == ["GET", "PUT", "GET"]


def test_standin_two_replicas_renewing_at_once_write_the_secret_once(
    tmp_path: Path, issuer: Issuer, ca: CertificateAuthority, cleanup: list[Any]
) -> None:
    old = serving_pair(ca, age_days=70)
    # Both replicas' first GETs meet, so both PUT with the same resourceVersion.
    api = with_standin(tmp_path, issuer, old, rendezvous=2)
    replicas = [mounted_dir(tmp_path / f"replica-{n}", ca, old) for n in "ab"]
    cleanup += [api, *replicas]
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
    procs = [start_upkeep(d, kubeconfig, rounds=1) for d in replicas]
    logs = [finish(p) for p in procs]

    assert api.secrets[TLS]["metadata"]["resourceVersion"] == "2"  # one write won
    methods = [m for m, _ in secret_requests(api)]
    assert sorted(methods) == ["GET", "GET", "GET", "PUT", "PUT"]  # the loser re-read once
    assert sum("renewed the serving certificate in Secret" in log for log in logs) == 1
    # The Secret's race only: the caBundle PATCHes of the two replicas may race too, and say so.
    secret_race = "update of Secret sidemesh-system/sidemesh-tls raced another writer"
    assert sum(secret_race in log for log in logs) == 1
    data = api.secret_data("sidemesh-tls")
    openssl_verify(tmp_path, ca.root_pem, data["tls.crt"].decode(), purpose="sslserver")
    key = serialization.load_pem_private_key(data["tls.key"], None)
    assert key.public_key() == x509.load_pem_x509_certificate(data["tls.crt"]).public_key()


def test_standin_fresh_cert_on_a_read_only_mount_is_left_alone(
    tmp_path: Path, issuer: Issuer, ca: CertificateAuthority, cleanup: list[Any]
) -> None:
    fresh = serving_pair(ca, age_days=10)
    api = with_standin(tmp_path, issuer, fresh)
    certs = mounted_dir(tmp_path / "certs", ca, fresh)
    cleanup += [api, certs]
    log = finish(start_upkeep(certs, api.kubeconfig(tmp_path / "kubeconfig"), rounds=3))

    assert secret_requests(api) == []  # not due: the Secret is not even read
    assert api.secret_data("sidemesh-tls")["tls.crt"] == fresh[0].encode()
    assert api.secrets[TLS]["metadata"]["resourceVersion"] == "1"
    assert any(r.method == "PATCH" for r in api.requests)  # the caBundle upkeep did run
    assert "renew" not in log.replace(".renew.lock", "")


def test_standin_not_configured_read_only_mount_warns_once_how_to_renew(
    tmp_path: Path, issuer: Issuer, ca: CertificateAuthority, cleanup: list[Any]
) -> None:
    old = serving_pair(ca, age_days=70)
    api = with_standin(tmp_path, issuer, old)  # running, but nobody told the server about it
    certs = mounted_dir(tmp_path / "certs", ca, old)
    cleanup += [api, certs]
    log = finish(start_upkeep(certs, None, rounds=4))

    warnings = [line for line in log.splitlines() if WARNING in line]
    assert len(warnings) == 1, log
    assert warnings[0].startswith("WARNING") and "`sidemesh install`" in warnings[0]
    assert "renewal failed" not in log and "Permission denied" not in log
    assert (certs / "tls.crt").read_text() == old[0]
    assert api.requests == []


# --- the Secret calls themselves ------------------------------------------------------------


def test_standin_secret_update_rereads_after_a_conflict(
    tmp_path: Path, issuer: Issuer, ca: CertificateAuthority, cleanup: list[Any]
) -> None:
    api = with_standin(tmp_path, issuer, serving_pair(ca, age_days=70))
    cleanup.append(api)
    client = api.client()
    seen: list[bytes] = []

    def change(data: dict[str, bytes]) -> dict[str, bytes] | None:
        seen.append(data["tls.crt"])
        if len(seen) == 1:  # another writer slips in between our read and our write
            api.secrets[TLS]["metadata"]["resourceVersion"] = "7"
            return {"tls.crt": b"mine"}
        return None  # on the re-read: the other writer's result is fine

    assert client.update_secret(change) is False
    assert [m for m, _ in secret_requests(api)] == ["GET", "PUT", "GET"]
    assert len(seen) == 2 and api.secret_data("sidemesh-tls")["tls.crt"] != b"mine"

    assert client.update_secret(lambda d: {"tls.crt": b"new"}) is True
    assert api.secret_data("sidemesh-tls")["tls.crt"] == b"new"
    assert "tls.key" in api.secret_data("sidemesh-tls")  # keys not named are kept
    assert api.secrets[TLS]["metadata"]["resourceVersion"] == "8"


def test_standin_rbac_allows_only_our_serving_secret(
    tmp_path: Path, issuer: Issuer, ca: CertificateAuthority, cleanup: list[Any]
) -> None:
    api = with_standin(tmp_path, issuer, serving_pair(ca, age_days=10))
    api.add_secret("other", {"tls.crt": b"x"})
    api.add_secret("sidemesh-tls", {"tls.crt": b"x"}, namespace="default")
    cleanup.append(api)
    client = api.client()
    for name, namespace in [("other", "sidemesh-system"), ("sidemesh-tls", "default")]:
        with pytest.raises(KubeAPIError) as err:
            client.read_secret(name, namespace)
        assert err.value.status == 403
        with pytest.raises(KubeAPIError) as err:
            client.update_secret(lambda d: {"a": b"b"}, name, namespace)
        assert err.value.status == 403
    assert "tls.crt" in client.read_secret()


def test_standin_writable_cert_dir_keeps_renewing_files_not_the_secret(
    tmp_path: Path, issuer: Issuer, ca: CertificateAuthority, cleanup: list[Any]
) -> None:
    old = serving_pair(ca, age_days=70)
    api = with_standin(tmp_path, issuer, old)
    certs = mounted_dir(tmp_path / "certs", ca, old)
    cleanup.append(api)
    asyncio.run(CAUpkeep(certs, config=MeshConfig(), kube=api.client()).run_once())

    assert (certs / "tls.crt").read_text() != old[0]  # a local run: the files are renewed
    assert (
        secret_requests(api) == [] and api.secret_data("sidemesh-tls")["tls.crt"] == old[0].encode()
    )
