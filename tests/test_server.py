"""The webhook over real HTTPS on 127.0.0.1, the client trusting only the mesh root."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import ssl
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonpatch
import orjson
import pytest
from cryptography import x509

from tests.support.webhook_https import (
    SAMPLE_REVIEW,
    V1,
    V1BETA1,
    Running,
    admission_review,
    client_ssl,
    https_webhook,
    make_pki,
    simple_pod,
)
from webhook.ca.authority import CA_CERT, TLS_CERT
from webhook.config import MeshConfig, load_config
from webhook.inject.pod import inject_pod

UID = "7f0c2a9e-0000-4000-8000-000000000001"


@pytest.fixture(scope="module")
def webhook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    config = load_config({"webhook": {"max_body_bytes": 64 * 1024}})
    with https_webhook(tmp_path_factory.mktemp("pki"), config=config) as running:
        yield running


@pytest.fixture()
def client(webhook: Running) -> Iterator[httpx.Client]:
    with webhook.client() as c:
        yield c


def expected_pod(review: dict[str, Any], cert_dir: Path) -> dict[str, Any]:
    req = review["request"]
    namespace = req["object"]["metadata"].get("namespace") or req["namespace"]
    bundle = (cert_dir / CA_CERT).read_text()
    result: dict[str, Any] = inject_pod(
        req["object"], namespace=namespace, config=MeshConfig(), bundle=bundle
    ).pod
    return result


@pytest.mark.parametrize("version", [V1, V1BETA1])
def test_the_sample_review_is_answered_with_the_cores_patch(
    webhook: Running, client: httpx.Client, version: str
) -> None:
    review = json.loads(SAMPLE_REVIEW.read_text())
    review["apiVersion"] = version
    r = client.post("/mutate", json=review)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert (body["apiVersion"], body["kind"]) == (version, "AdmissionReview")
    resp = body["response"]
    assert resp["uid"] == review["request"]["uid"] and resp["allowed"] is True
    assert resp["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(resp["patch"]))
    assert jsonpatch.apply_patch(review["request"]["object"], ops) == expected_pod(
        review, webhook.cert_dir
    )


def test_many_reviews_share_one_keep_alive_connection(client: httpx.Client) -> None:
    ports = set()
    for i in range(20):
        r = client.post("/mutate", json=admission_review(simple_pod(), uid=f"u-{i}"))
        assert r.json()["response"]["uid"] == f"u-{i}"
        ports.add(r.extensions["network_stream"].get_extra_info("client_addr")[1])
    assert len(ports) == 1


def test_skip_response_shape(client: httpx.Client) -> None:
    r = client.post("/mutate", json=admission_review(simple_pod(hostNetwork=True)))
    assert r.status_code == 200
    resp = r.json()["response"]
    assert set(resp) == {"uid", "allowed", "auditAnnotations", "warnings"}
    assert resp["allowed"] is True and resp["uid"] == UID


def test_injection_errors_are_denials_with_code_400(client: httpx.Client) -> None:
    pod = simple_pod()
    pod["metadata"]["annotations"] = {"sidemesh.io/proxy-cpu": "lots"}
    r = client.post("/mutate", json=admission_review(pod))
    assert r.status_code == 200
    resp = r.json()["response"]
    assert resp["uid"] == UID and resp["allowed"] is False
    assert resp["status"]["code"] == 400
    assert "sidemesh.io/proxy-cpu" in resp["status"]["message"]
    assert "lots" in resp["status"]["message"]


def _no_uid() -> bytes:
    doc = admission_review(simple_pod())
    del doc["request"]["uid"]
    return orjson.dumps(doc)


@pytest.mark.parametrize(
    ("content", "content_type", "status", "error"),
    [
        (b"this is not json", "application/json", 400, "not-json"),
        (
            b'{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}',
            "application/json",
            400,
            "no-request",
        ),
        (_no_uid(), "application/json", 400, "no-uid"),
        (orjson.dumps(admission_review(simple_pod())), "text/plain", 415, "content-type"),
        (orjson.dumps(admission_review(simple_pod())), None, 415, "content-type"),
        (b"x" * (64 * 1024 + 1), "application/json", 413, "too-large"),
    ],
)
def test_malformed_requests_get_clear_json_errors(
    client: httpx.Client, content: bytes, content_type: str | None, status: int, error: str
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    r = client.post("/mutate", content=content, headers=headers)
    assert r.status_code == status
    body = r.json()
    assert body["error"] == error and body["message"]
    assert "Traceback" not in r.text


def test_a_chunked_body_above_the_limit_is_cut_off_with_413(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(80):
            yield b" " * 1024

    r = client.post("/mutate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "too-large"


def test_an_error_answer_names_the_uid_when_it_could_be_read(client: httpx.Client) -> None:
    doc = {**admission_review(simple_pod()), "apiVersion": "admission.k8s.io/v9"}
    r = client.post("/mutate", json=doc)
    assert r.status_code == 400
    assert r.json()["uid"] == UID and "apiVersion" in r.json()["message"]


def test_health_readiness_and_wrong_methods(client: httpx.Client, webhook: Running) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    cert = x509.load_pem_x509_certificate((webhook.cert_dir / TLS_CERT).read_bytes())
    assert ready.json()["certificateNotAfter"] == int(cert.not_valid_after_utc.timestamp())
    assert client.get("/mutate").status_code == 405
    assert client.post("/nothing-here").status_code == 404


def test_metrics_count_results_and_reasons(client: httpx.Client, webhook: Running) -> None:
    def count(result: str, reason: str) -> float:
        for line in client.get("/metrics").text.splitlines():
            if line.startswith(
                f'sidemesh_admission_requests_total{{reason="{reason}",result="{result}"}}'
            ):
                return float(line.split()[-1])
        return 0.0

    before = count("skipped", "host-network"), count("invalid", "not-json")
    client.post("/mutate", json=admission_review(simple_pod(hostNetwork=True)))
    client.post("/mutate", content=b"nope", headers={"content-type": "application/json"})
    assert (count("skipped", "host-network"), count("invalid", "not-json")) == (
        before[0] + 1,
        before[1] + 1,
    )
    text = client.get("/metrics").text
    assert 'sidemesh_admission_duration_seconds_bucket{le="0.0001",result="skipped"}' in text
    cert = x509.load_pem_x509_certificate((webhook.cert_dir / TLS_CERT).read_bytes())
    expiry = cert.not_valid_after_utc.timestamp()
    # Compared as numbers: the exposition drops trailing zeros (1.80340895e+09).
    gauge = [
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("sidemesh_serving_cert_expiry_timestamp_seconds ")
    ]
    assert gauge == [expiry]
    assert 'sidemesh_build_info{python="' in text


def test_the_server_is_verified_against_the_mesh_root_only(
    webhook: Running, tmp_path: Path
) -> None:
    other = make_pki(tmp_path / "other")
    with (
        httpx.Client(base_url=webhook.url, verify=client_ssl(other / CA_CERT)) as stranger,
        pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        stranger.get("/healthz")


def _handshake(webhook: Running, ctx: ssl.SSLContext) -> str | None:
    with (
        socket.create_connection(("127.0.0.1", webhook.port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        return tls.version()


def test_tls_1_3_is_preferred_and_nothing_below_1_2_is_accepted(webhook: Running) -> None:
    ctx = client_ssl(webhook.cert_dir / CA_CERT)
    assert _handshake(webhook, ctx) == "TLSv1.3"
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    assert _handshake(webhook, ctx) == "TLSv1.2"
    assert webhook.tls.front.minimum_version == ssl.TLSVersion.TLSv1_2
    old = client_ssl(webhook.cert_dir / CA_CERT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    with contextlib.suppress(ssl.SSLError):  # let this client offer them at all
        old.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionError)) as info:
        _handshake(webhook, old)
    assert "NO_PROTOCOLS_AVAILABLE" not in str(info.value)  # refused by the server


def test_a_bug_in_a_route_is_a_fixed_500_and_is_counted(tmp_path: Path) -> None:
    """No exception text reaches the client; sidemesh_unexpected_errors_total says a bug ran."""
    from fastapi import APIRouter

    from tests.support.server_thread import ServerThread
    from tests.support.webhook_https import client_ssl, make_pki
    from webhook.ca.authority import TLS_KEY
    from webhook.server.app import create_app
    from webhook.server.metrics import Metrics
    from webhook.server.tlsreload import ReloadingTLS

    router = APIRouter()

    @router.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals")

    certs = make_pki(tmp_path / "pki")
    metrics = Metrics()
    tls = ReloadingTLS(certs / TLS_CERT, certs / TLS_KEY, check_interval=0)
    app = create_app(config=MeshConfig(), bundle="", metrics=metrics, tls=tls, routers=[router])
    with (
        ServerThread(app, tls) as srv,
        httpx.Client(base_url=srv.url, verify=client_ssl(certs / CA_CERT)) as c,
    ):
        r = c.get("/boom")
        assert r.status_code == 500 and "secret" not in r.text
        assert r.json()["error"] == "internal"
        assert 'sidemesh_unexpected_errors_total{where="app"} 1.0' in c.get("/metrics").text
