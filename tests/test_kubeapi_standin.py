"""TokenReview and caBundle patching through the official kubernetes client — against the local
kube-apiserver STAND-IN (tests/apiserver_standin.py), not a real API server: none exists here.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from tests.support.apiserver_standin import APIServerStandin
from tests.support.ca_server import post, serve_ca
from tests.support.jwks_issuer import Issuer
from tests.support.pki import make_csr, openssl_verify
from webhook.ca.api import VerifierOptions
from webhook.ca.authority import CertificateAuthority
from webhook.ca.serving import ensure_dev_pki
from webhook.ca.tokenreview import TokenReviewVerifier
from webhook.ca.tokens import Identity, JWKSVerifier
from webhook.ca.upkeep import CAUpkeep
from webhook.config import MeshConfig
from webhook.kube.client import KubeAPIError, KubeClient
from webhook.server.logs import configure_logging

# --- TokenReview ------------------------------------------------------------------------------


def test_standin_token_review_of_a_projected_token(
    standin: APIServerStandin, issuer: Issuer
) -> None:
    review = standin.client().review_token
    result = review(issuer.token("shop", "cart", "cart-abc"))
    assert result.authenticated
    assert result.username == "system:serviceaccount:shop:cart"
    assert result.audiences == ("sidemesh-ca",)
    assert result.pod_name == "cart-abc"
    sent = standin.requests[-1]
    assert (sent.method, sent.path) == ("POST", "/apis/authentication.k8s.io/v1/tokenreviews")
    assert sent.body["kind"] == "TokenReview"
    assert sent.body["spec"]["audiences"] == ["sidemesh-ca"]


def test_standin_token_review_verifier_decides_like_the_api_server(
    standin: APIServerStandin, issuer: Issuer
) -> None:
    verifier = TokenReviewVerifier(standin.client().review_token)
    good = issuer.token("shop", "cart", "cart-abc")
    assert asyncio.run(verifier.verify(good)) == Identity("shop", "cart", "cart-abc")
    cases = {
        "expired": (issuer.token("a", "b", ttl=1, now=0), 401, "unauthenticated"),
        "other audience": (issuer.token("a", "b", audience="vault"), 401, "unauthenticated"),
        "forged": (Issuer.create().token("a", "b"), 401, "unauthenticated"),
        "user": (issuer.token("a", "b", subject="jane"), 403, "not-a-service-account"),
    }
    from webhook.errors import IdentityError

    for name, (token, status, reason) in cases.items():
        with pytest.raises(IdentityError) as err:
            asyncio.run(verifier.verify(token))
        assert (err.value.status, err.value.reason) == (status, reason), name


def test_standin_refusing_our_credentials_is_a_503_not_a_pass(
    standin: APIServerStandin, issuer: Issuer
) -> None:
    from webhook.errors import IdentityError

    verifier = TokenReviewVerifier(standin.client("wrong-token").review_token)
    with pytest.raises(IdentityError) as err:
        asyncio.run(verifier.verify(issuer.token("a", "b")))
    assert err.value.status == 503


def test_standin_ca_api_with_token_review_end_to_end(
    standin: APIServerStandin, issuer: Issuer, tmp_path: Path
) -> None:
    verifier = TokenReviewVerifier(standin.client().review_token)
    with serve_ca(tmp_path / "pki", verifier) as srv:
        resp = post(srv, {"csr": make_csr().decode()}, issuer.token("shop", "cart"))
        assert resp.status_code == 200, resp.text
        assert resp.json()["spiffeId"] == "spiffe://cluster.local/ns/shop/sa/cart"
        openssl_verify(
            tmp_path, srv.ca.root_pem, resp.json()["certificateChain"], purpose="sslclient"
        )
        refused = post(srv, {"csr": make_csr().decode()}, issuer.token("a", "b", audience="x"))
        assert refused.status_code == 401


def test_standin_jwks_url_verifier(standin: APIServerStandin, issuer: Issuer) -> None:
    opts = VerifierOptions(
        jwks_url=standin.url + "/openid/v1/jwks",
        jwks_issuer=issuer.issuer_url,
        jwks_ca_file=str(standin.ca_file),
    )
    verifier = opts.build()
    assert isinstance(verifier, JWKSVerifier)
    assert asyncio.run(verifier.verify(issuer.token("a", "b"))) == Identity("a", "b", "pod-0")


# --- caBundle -----------------------------------------------------------------------------------


def test_standin_ca_bundle_patch(standin: APIServerStandin, tmp_path: Path) -> None:
    standin.add_webhook_config("sidemesh-injector", hooks=2)
    api = standin.client()
    root = CertificateAuthority.create(now=datetime.now(UTC)).root_pem
    assert api.read_ca_bundles() == [None, None]
    assert api.patch_ca_bundle(root) == 2
    patch = standin.requests[-1]
    assert patch.method == "PATCH"
    assert patch.content_type == "application/json-patch+json"
    assert patch.body[0]["op"] == "test"  # guarded by the resourceVersion read just before
    assert api.read_ca_bundles() == [root, root]
    stored = standin.webhook_configs["sidemesh-injector"]
    assert base64.b64decode(stored["webhooks"][0]["clientConfig"]["caBundle"]).decode() == root
    assert stored["webhooks"][0]["clientConfig"]["service"]["name"] == "sidemesh"  # untouched
    # Up to date: nothing is sent.
    count = len(standin.requests)
    assert api.patch_ca_bundle(root) == 0
    assert [r.method for r in standin.requests[count:]] == ["GET"]


def test_standin_ca_bundle_patch_retries_a_conflict(standin: APIServerStandin) -> None:
    standin.add_webhook_config("sidemesh-injector")
    standin.fail_next_patches = 1
    root = CertificateAuthority.create(now=datetime.now(UTC)).root_pem
    assert standin.client().patch_ca_bundle(root) == 1
    assert [r.method for r in standin.requests] == ["GET", "PATCH", "GET", "PATCH"]


def test_standin_rbac_limits_us_to_our_webhook_configuration(standin: APIServerStandin) -> None:
    standin.add_webhook_config("someone-else")
    with pytest.raises(KubeAPIError) as err:
        standin.client().patch_ca_bundle("x", "someone-else")
    assert err.value.status == 403


# --- the upkeep service -------------------------------------------------------------------------


def test_standin_upkeep_patches_on_start_and_when_the_root_changes(
    standin: APIServerStandin, tmp_path: Path
) -> None:
    standin.add_webhook_config("sidemesh-injector")
    pki = tmp_path / "pki"
    ensure_dev_pki(pki, now=datetime.now(UTC))
    upkeep = CAUpkeep(pki, config=MeshConfig(), kube=standin.client(), interval=3600)

    async def scenario() -> None:
        await upkeep.start()
        try:
            first = (pki / "ca.crt").read_text()
            assert standin.client().read_ca_bundles() == [first]
            patches = sum(r.method == "PATCH" for r in standin.requests)
            await upkeep.run_once()  # same root: no patch
            assert sum(r.method == "PATCH" for r in standin.requests) == patches
            # The root is replaced (sidemesh ca init --force): the next round follows it.
            CertificateAuthority.create(now=datetime.now(UTC)).save(pki)
            await upkeep.run_once()
            second = (pki / "ca.crt").read_text()
            assert second != first
            assert standin.client().read_ca_bundles() == [second]
        finally:
            await upkeep.stop()

    asyncio.run(scenario())


def test_upkeep_renews_the_serving_cert_in_its_last_third(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    ensure_dev_pki(tmp_path, now=now)
    old = (tmp_path / "tls.crt").read_text()
    clock = [now + timedelta(days=10)]
    renewed: list[bool] = []
    upkeep = CAUpkeep(
        tmp_path,
        config=MeshConfig(),
        clock=lambda: clock[0],
        on_serving_cert_renewed=lambda: renewed.append(True),
    )
    asyncio.run(upkeep.run_once())
    assert (tmp_path / "tls.crt").read_text() == old and not renewed
    clock[0] = now + timedelta(days=61)
    asyncio.run(upkeep.run_once())
    new = (tmp_path / "tls.crt").read_text()
    assert new != old and renewed == [True]
    openssl_verify(
        tmp_path, (tmp_path / "ca.crt").read_text(), new, purpose="sslserver", at=clock[0]
    )
    names = (
        x509.load_pem_x509_certificate(new.encode())
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value.get_values_for_type(x509.DNSName)
    )
    assert "sidemesh.sidemesh-system.svc" in names
    assert (tmp_path / "tls.key").stat().st_mode & 0o777 == 0o600


def test_upkeep_survives_an_unreachable_api_server(tmp_path: Path) -> None:
    ensure_dev_pki(tmp_path, now=datetime.now(UTC))
    # A port nothing listens on (bound, never accepted): connection refused.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    api = KubeClient.at(f"https://127.0.0.1:{port}", token="t")
    upkeep = CAUpkeep(tmp_path, config=MeshConfig(), kube=api)
    asyncio.run(upkeep.run_once())  # logs a warning, does not raise
    assert upkeep.patched_root is None


def test_upkeep_renewals_racing_in_parallel_leave_a_matching_pair(tmp_path: Path) -> None:
    import threading

    from cryptography.hazmat.primitives import serialization

    now = datetime.now(UTC)
    ensure_dev_pki(tmp_path, now=now)
    later = now + timedelta(days=61)
    workers = [CAUpkeep(tmp_path, config=MeshConfig(), clock=lambda: later) for _ in range(4)]
    renewed: list[bool] = []
    threads = [
        threading.Thread(target=lambda u=u: renewed.append(u._renew_serving_cert()))
        for u in workers
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(renewed) == [False, False, False, True]  # one renews, the rest find it fresh
    cert = x509.load_pem_x509_certificate((tmp_path / "tls.crt").read_bytes())
    key = serialization.load_pem_private_key((tmp_path / "tls.key").read_bytes(), None)
    assert key.public_key() == cert.public_key()


def test_standin_client_info_lines_reach_the_sidemesh_log(standin: APIServerStandin) -> None:
    """What the client does to the cluster (a caBundle patch) shows in the server's log: its
    logger sits under ``sidemesh``, the one ``sidemesh serve`` configures."""
    standin.add_webhook_config("sidemesh-injector")
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    try:
        root = CertificateAuthority.create(now=datetime.now(UTC)).root_pem
        assert standin.client().patch_ca_bundle(root) == 1
    finally:
        configure_logging("info")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["logger"], line["level"]) for line in lines] == [("sidemesh.kube", "info")]
    assert "patched caBundle of 1 webhook(s) in sidemesh-injector" in lines[0]["msg"]


def test_standin_pod_annotations(standin: APIServerStandin) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "demo", "annotations": {"a.io/x": "1"}},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]},
    }
    standin.pods[("demo", "web")] = pod
    kube = KubeClient.at(
        standin.url, token=standin.caller_token, ca_file=str(standin.ca_file), timeout=2
    )
    assert kube.pod_annotations("demo", "web") == {"a.io/x": "1"}
    with pytest.raises(KubeAPIError) as err:
        kube.pod_annotations("demo", "gone")
    assert err.value.status == 404 and 'pods "gone" not found' in str(err.value)


@pytest.mark.parametrize("content", [None, "clusters: [", "apiVersion: v1\nkind: Config\n"])
def test_an_unusable_kubeconfig_is_a_clear_error(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "kubeconfig"
    if content is not None:
        path.write_text(content)
    with pytest.raises(KubeAPIError, match="no usable Kubernetes configuration in") as err:
        KubeClient.connect(kubeconfig=str(path))
    assert err.value.status == 0 and str(path) in str(err.value)
