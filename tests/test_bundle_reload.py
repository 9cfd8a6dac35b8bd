"""The trust bundle and the CA signer follow ca.crt/ca.key without a restart, over real HTTPS.

After the root files change (rewritten in place like ``sidemesh ca init --force``, or swapped
like a mounted Secret's ``..data`` symlink), the next ``POST /mutate`` puts the new bundle into
the pod and the next ``POST /v1/certificates`` returns a certificate that ``openssl verify``s
against the new root. A half-written or mismatched pair keeps the old one. The serving
certificate is left alone, so the client keeps trusting the root it started with.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client import CollectorRegistry

from tests.conftest import REPO, require_tools
from tests.support.apiserver_standin import APIServerStandin
from tests.support.jwks_issuer import DEFAULT_ISSUER, Issuer
from tests.support.pki import make_csr
from tests.support.serve_process import SIDEMESH, Serve
from tests.support.server_thread import ServerThread
from tests.support.wait import wait_for
from tests.support.webhook_https import admission_review, client_ssl, simple_pod
from webhook import names
from webhook.ca.api import router_from_config
from webhook.ca.authority import CA_CERT, CA_KEY, TLS_CERT, TLS_KEY, CertificateAuthority
from webhook.ca.serving import ensure_dev_pki
from webhook.ca.tokens import JWKSVerifier
from webhook.ca.trust import ReloadingTrust
from webhook.ca.upkeep import CAUpkeep
from webhook.config import CAConfig, MeshConfig
from webhook.files import write_atomic
from webhook.server.app import create_app
from webhook.server.metrics import Metrics
from webhook.server.tlsreload import ReloadingTLS

NAMES = (CA_CERT, CA_KEY, TLS_CERT, TLS_KEY)
STARTED = "Application startup complete."


def new_root() -> CertificateAuthority:
    return CertificateAuthority.create(now=datetime.now(UTC), common_name="sidemesh root 2")


def verifies(tmp: Path, roots_pem: str, cert_pem: str) -> bool:
    """``openssl verify -CAfile roots`` of a workload certificate (a TLS client's purpose)."""
    require_tools("openssl")
    roots, leaf = tmp / "verify-roots.pem", tmp / "verify-leaf.pem"
    roots.write_text(roots_pem)
    leaf.write_text(cert_pem)
    cmd = ["openssl", "verify", "-CAfile", str(roots), "-purpose", "sslclient", str(leaf)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return out.returncode == 0 and out.stdout.strip().endswith("OK")


def injected_bundle(answer: dict[str, Any]) -> str:
    """The trust-bundle annotation that the JSONPatch of an AdmissionReview answer sets."""
    ops = orjson.loads(base64.b64decode(answer["response"]["patch"]))
    key = names.TRUST_BUNDLE_ANNOTATION
    for op in ops:
        value = op.get("value")
        if op["path"].endswith("/" + key.replace("/", "~1")):
            return str(value)
        if isinstance(value, dict) and isinstance(value.get(key), str):
            return str(value[key])
        if isinstance(value, dict) and isinstance(value.get("annotations"), dict):
            found = value["annotations"].get(key)
            if isinstance(found, str):
                return found
    raise AssertionError(f"no {key} in the patch: {ops}")


def secret_layout(cert_dir: Path, source: Path) -> None:
    """``cert_dir`` laid out like a mounted Secret: ``name -> ..data/name``, ``..data -> ..ts``."""
    cert_dir.mkdir()
    swap_secret(cert_dir, {name: (source / name).read_bytes() for name in NAMES})
    for name in NAMES:
        (cert_dir / name).symlink_to(f"..data/{name}")


def swap_secret(cert_dir: Path, files: dict[str, bytes]) -> None:
    """What the kubelet does on a Secret update: a new timestamped dir, one symlink rename."""
    data = cert_dir / "..data"
    old = os.readlink(data) if data.is_symlink() else None
    stamp = cert_dir / f"..2026_11_25_{len(list(cert_dir.glob('..2026_*'))) + 1:04d}"
    stamp.mkdir()
    for name in NAMES:
        content = files.get(name) or (data / name).read_bytes()
        (stamp / name).write_bytes(content)
    (cert_dir / "..data_tmp").symlink_to(stamp.name)
    os.replace(cert_dir / "..data_tmp", data)
    if old:
        shutil.rmtree(cert_dir / old)


@dataclass
class Mesh:
    """``sidemesh serve``'s worker, wired as :func:`webhook.server.workers.run_worker` wires
    it, in a thread."""

    url: str
    cert_dir: Path
    old_root: Path  # the client trusts the root it started with (the serving cert's)
    issuer: Issuer
    metrics: Metrics

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=client_ssl(self.old_root), timeout=10)

    def bundle(self, client: httpx.Client) -> str:
        r = client.post("/mutate", json=admission_review(simple_pod()))
        assert r.status_code == 200, r.text
        return injected_bundle(r.json())

    def certificate(self, client: httpx.Client, account: str = "cart") -> dict[str, str]:
        token = self.issuer.token("shop", account, f"{account}-7d9f-abcde")
        r = client.post(
            "/v1/certificates",
            json={"csr": make_csr().decode()},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 200, r.text
        body: dict[str, str] = r.json()
        return body

    def reloads(self, result: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "sidemesh_trust_bundle_reloads_total", {"result": result}
        )
        return value or 0.0


@contextlib.contextmanager
def mesh(cert_dir: Path, tmp: Path, *, interval: float = 0.0) -> Iterator[Mesh]:
    issuer = Issuer.create(DEFAULT_ISSUER)
    config = MeshConfig(ca=CAConfig(rate_per_identity_per_minute=1000))
    metrics = Metrics(CollectorRegistry())
    tls = ReloadingTLS(cert_dir / TLS_CERT, cert_dir / TLS_KEY, check_interval=interval)
    trust = ReloadingTrust(cert_dir, check_interval=interval, on_reload=metrics.trust_reloaded)
    verifier = JWKSVerifier(issuer.issuer_url, jwks=issuer.jwks())
    router = router_from_config(config, cert_dir, verifier, registry=metrics.registry, trust=trust)
    assert router is not None
    app = create_app(config=config, bundle=trust.bundle, metrics=metrics, tls=tls, routers=[router])
    old_root = tmp / "client-trusts.pem"
    old_root.write_bytes((cert_dir / CA_CERT).read_bytes())
    with ServerThread(app, tls) as srv:
        yield Mesh(srv.url, cert_dir, old_root, issuer, metrics)


def dev_pki(directory: Path) -> CertificateAuthority:
    ensure_dev_pki(directory, now=datetime.now(UTC))
    return CertificateAuthority.load(directory)


def assert_serves(m: Mesh, tmp: Path, root: CertificateAuthority, *, other: str = "") -> None:
    """Pods get ``root`` alone and workload certs verify against it, not against ``other``."""
    with m.client() as c:
        assert m.bundle(c) == root.root_pem
        answer = m.certificate(c)
    assert answer["trustBundle"] == root.root_pem
    assert verifies(tmp, root.root_pem, answer["certificateChain"])
    assert not other or not verifies(tmp, other, answer["certificateChain"])


# --- plain rewrite (`sidemesh ca init --force`) ----------------------------------------------


def test_ca_init_force_reaches_the_next_pod_and_the_next_certificate(tmp_path: Path) -> None:
    cert_dir = tmp_path / "certs"
    old = dev_pki(cert_dir)
    with mesh(cert_dir, tmp_path) as m:
        assert_serves(m, tmp_path, old)
        out = subprocess.run(
            [*SIDEMESH, "ca", "init", "--force", "--dir", str(cert_dir)],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        new = CertificateAuthority.load(cert_dir)
        assert new.root_pem != old.root_pem
        assert_serves(m, tmp_path, new, other=old.root_pem)
        assert m.reloads("success") == 1


# --- a mounted Secret's ..data swap, under load ----------------------------------------------


class Load:
    """Client threads alternating /mutate and /v1/certificates until stopped; half of them
    open a new TLS connection per request. Counts every answer that is not a 200."""

    def __init__(self, m: Mesh, threads: int = 4) -> None:
        self.m = m
        self.ok = 0
        self.failures: list[str] = []
        self.bundles: set[str] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(threads)
        ]

    def _loop(self, n: int) -> None:
        client = self.m.client()
        try:
            while not self._stop.is_set():
                if n % 2 == 0:
                    client.close()
                    client = self.m.client()
                try:
                    bundle = self.m.bundle(client)
                    self.m.certificate(client, account=f"sa-{n}")
                    outcome = ""
                except (httpx.HTTPError, AssertionError) as exc:
                    outcome, bundle = f"{type(exc).__name__}: {exc}", ""
                with self._lock:
                    if outcome:
                        self.failures.append(outcome)
                    else:
                        self.ok += 1
                        self.bundles.add(bundle)
        finally:
            client.close()

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=20)


def test_a_secret_swap_under_load_fails_no_request(tmp_path: Path) -> None:
    old = dev_pki(tmp_path / "pki")
    cert_dir = tmp_path / "certs"
    secret_layout(cert_dir, tmp_path / "pki")
    new = new_root()
    with mesh(cert_dir, tmp_path, interval=0.05) as m, Load(m) as load:
        wait_for(lambda: load.ok >= 8)
        swap_secret(
            cert_dir,
            {CA_CERT: new.root_pem.encode(), CA_KEY: (_key_pem(new)).encode()},
        )
        with m.client() as c:
            wait_for(lambda: m.bundle(c) == new.root_pem)
        seen = load.ok
        wait_for(lambda: load.ok >= seen + 8)
        assert_serves(m, tmp_path, new, other=old.root_pem)
    assert load.failures == []
    assert load.bundles == {old.root_pem, new.root_pem}
    assert m.reloads("success") == 1 and m.reloads("failure") == 0


# --- what is refused --------------------------------------------------------------------------


def test_a_half_written_or_mismatched_pair_keeps_the_old_root(tmp_path: Path) -> None:
    cert_dir = tmp_path / "certs"
    old = dev_pki(cert_dir)
    new = new_root()
    key_pem, old_key = _key_pem(new).encode(), (cert_dir / CA_KEY).read_bytes()
    with mesh(cert_dir, tmp_path) as m:
        # The new cert without its key; the bundle cut off inside the new root; an empty key;
        # the new key with the old cert (what `ca init --force` leaves for a moment).
        broken = [
            (new.root_pem.encode(), old_key),
            ((old.root_pem + new.root_pem[:300]).encode(), old_key),
            (old.root_pem.encode(), b""),
            (old.root_pem.encode(), key_pem),
        ]
        for n, (cert_pem, key) in enumerate(broken, start=1):
            (cert_dir / CA_CERT).write_bytes(cert_pem)
            (cert_dir / CA_KEY).write_bytes(key)
            assert_serves(m, tmp_path, old, other=new.root_pem)
            assert m.reloads("failure") == n
        # Completing the pair is picked up.
        write_atomic(cert_dir / CA_KEY, key_pem, mode=0o600)
        write_atomic(cert_dir / CA_CERT, new.root_pem.encode(), mode=0o644)
        assert_serves(m, tmp_path, new, other=old.root_pem)
        assert m.reloads("success") == 1


def test_a_refused_state_is_logged_once_and_never_names_the_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert_dir = tmp_path / "certs"
    dev_pki(cert_dir)
    key_text = (cert_dir / CA_KEY).read_text()
    trust = ReloadingTrust(cert_dir, check_interval=0)
    (cert_dir / CA_CERT).write_text(new_root().root_pem)
    with caplog.at_level("INFO", logger="sidemesh.trust"):
        for _ in range(5):
            trust.bundle()
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1
    secret_body = key_text.split("\n")[1]
    assert all(secret_body not in r.getMessage() for r in caplog.records)


# --- a root rotation with an overlap ---------------------------------------------------------


def test_rotation_with_both_roots_in_the_bundle(tmp_path: Path) -> None:
    cert_dir = tmp_path / "certs"
    old = dev_pki(cert_dir)
    new = new_root()
    both = old.root_pem + new.root_pem
    with mesh(cert_dir, tmp_path) as m, m.client() as c:
        # 1. The new root joins the bundle; the old one still signs.
        write_atomic(cert_dir / CA_CERT, both.encode(), mode=0o644)
        assert m.bundle(c) == both
        answer = m.certificate(c)
        assert answer["trustBundle"] == both
        assert verifies(tmp_path, old.root_pem, answer["certificateChain"])
        # 2. Pods rolled: switch the signer to the new key, both roots still trusted.
        write_atomic(cert_dir / CA_KEY, _key_pem(new).encode(), mode=0o600)
        answer = m.certificate(c)
        assert m.bundle(c) == both and answer["trustBundle"] == both
        assert verifies(tmp_path, new.root_pem, answer["certificateChain"])
        assert not verifies(tmp_path, old.root_pem, answer["certificateChain"])
        # 3. Drop the old root.
        write_atomic(cert_dir / CA_CERT, new.root_pem.encode(), mode=0o644)
        assert m.bundle(c) == new.root_pem
        assert m.certificate(c)["trustBundle"] == new.root_pem
    assert m.reloads("success") == 3 and m.reloads("failure") == 0


# --- the caBundle upkeep never patches a half-written bundle (kube-apiserver STAND-IN) ----------


def test_standin_upkeep_skips_a_cut_off_bundle(tmp_path: Path) -> None:
    issuer = Issuer.create()
    cert_dir = tmp_path / "certs"
    old = dev_pki(cert_dir)
    new = new_root()
    with APIServerStandin(tmp_path / "standin", issuer) as standin:
        standin.add_webhook_config("sidemesh-injector")
        api = standin.client()
        upkeep = CAUpkeep(cert_dir, config=MeshConfig(), kube=api, interval=3600)
        asyncio.run(upkeep.run_once())
        assert api.read_ca_bundles() == [old.root_pem]
        (cert_dir / CA_CERT).write_text(old.root_pem + new.root_pem[:300])
        asyncio.run(upkeep.run_once())
        assert api.read_ca_bundles() == [old.root_pem]
        (cert_dir / CA_CERT).write_text(old.root_pem + new.root_pem)
        asyncio.run(upkeep.run_once())
        assert api.read_ca_bundles() == [old.root_pem + new.root_pem]


# --- `sidemesh serve --workers 2`: each worker reloads on its own --------------------------------


def test_each_worker_reloads_on_its_own(tmp_path: Path) -> None:
    issuer = Issuer.create(DEFAULT_ISSUER)
    jwks = issuer.write_jwks(tmp_path / "jwks.json")
    s = Serve(
        tmp_path,
        "--workers",
        "2",
        "--reload-interval",
        "0.1",
        "--jwks-file",
        str(jwks),
        "--jwks-issuer",
        DEFAULT_ISSUER,
    )
    try:
        s.wait_ready()
        # Both workers must have read the old root, or a late one would start with the new.
        wait_for(lambda: sum(line.get("msg") == STARTED for line in s.lines()) == 2)
        new = new_root()
        # The client trusts both roots, like the API server once the upkeep has patched the
        # caBundle: a worker's upkeep re-issues the serving cert from the new root.
        trusted = tmp_path / "client-trusts.pem"
        trusted.write_text((s.cert_dir / CA_CERT).read_text() + new.root_pem)
        new.save(s.cert_dir)

        def client() -> httpx.Client:
            return httpx.Client(base_url=s.url, verify=client_ssl(trusted), timeout=10)

        def reloads() -> float:
            with client() as c:
                text = c.get("/metrics").text  # the sum over both workers
            total = 0.0
            for line in text.splitlines():
                if line.startswith('sidemesh_trust_bundle_reloads_total{result="success"}'):
                    total += float(line.split()[-1])
            return total

        def poke() -> bool:  # new connections spread over both workers (SO_REUSEPORT)
            for _ in range(4):
                with client() as c:
                    c.post("/mutate", json=admission_review(simple_pod()))
            return reloads() >= 2

        wait_for(poke, timeout=20)
        assert reloads() == 2
        for _ in range(10):
            with client() as c:
                r = c.post("/mutate", json=admission_review(simple_pod()))
                assert injected_bundle(r.json()) == new.root_pem
                token = issuer.token("shop", "cart", "cart-7d9f-abcde")
                r = c.post(
                    "/v1/certificates",
                    json={"csr": make_csr().decode()},
                    headers={"Authorization": f"Bearer {token}"},
                )
                assert r.status_code == 200, r.text
                assert verifies(tmp_path, new.root_pem, r.json()["certificateChain"])
        logged = [line for line in s.lines() if line.get("event") == "trust-reload"]
        assert len(logged) == 2
    finally:
        assert s.stop() == 0


def _key_pem(ca: CertificateAuthority) -> str:
    from cryptography.hazmat.primitives import serialization

    return ca.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
