"""Hostile AdmissionReviews: inputs that made the core raise, now clear refusals.

A real `sidemesh serve` over HTTPS. Each answer names what is wrong; none is a 5xx, a
``code: 500`` denial or the generic ``internal`` error, and no exception reaches a generic
handler (``sidemesh_unexpected_errors_total`` stays at 0).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonpatch
import pytest

from tests.support.serve_process import (
    Serve,
    assert_no_unexpected_errors,
    metric_value,
    serving,
)
from tests.support.webhook_https import admission_review, simple_pod
from webhook import names
from webhook.config import load_config
from webhook.inject.pod import inject_pod

JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    with serving(tmp_path_factory.mktemp("mutate")) as s:
        yield s


@pytest.fixture(autouse=True)
def no_unexpected_errors(server: Serve) -> Iterator[None]:
    yield
    assert_no_unexpected_errors(server)


def mutate(server: Serve, body: bytes) -> tuple[int, dict[str, Any]]:
    with server.client() as client:
        r = client.post("/mutate", content=body, headers=JSON)
    return r.status_code, r.json()


def nested_probe_review(depth: int) -> bytes:
    """A review whose pod has an HTTP probe with a field nested ``depth`` levels deep."""
    marker = '"__deep__"'
    pod = simple_pod()
    pod["spec"]["containers"][0]["readinessProbe"] = {
        "httpGet": {"port": 80, "path": "/ready"},
        "x-extra": "__deep__",
    }
    text = json.dumps(admission_review(pod))
    return text.replace(marker, '{"a":' * depth + "1" + "}" * depth).encode()


def test_a_probe_nested_beyond_the_encoder_depth_is_denied_with_a_reason(
    server: Serve,
) -> None:
    status, answer = mutate(server, nested_probe_review(300))
    assert status == 200
    response = answer["response"]
    assert response["allowed"] is False
    assert response["status"]["code"] == 400
    assert "nests JSON more than 255 levels" in response["status"]["message"]
    text = server.metrics()
    assert metric_value(text, "sidemesh_admission_requests_total", reason="too-deep") >= 1


def test_a_review_nested_beyond_the_parser_depth_is_a_400_not_json(server: Serve) -> None:
    status, answer = mutate(server, nested_probe_review(2000))
    assert (status, answer["error"]) == (400, "not-json")
    assert answer["message"].startswith("body is not valid JSON")


def test_an_injected_pod_left_with_only_the_proxy_is_denied_with_a_reason(
    server: Serve,
) -> None:
    """Classic mode: the proxy is a regular container; delete the app container after
    injection and the re-injection has nothing left to inject into (an IndexError before)."""
    classic = load_config({"proxy": {"native_sidecar": False}})
    pod = simple_pod()
    injected = jsonpatch.apply_patch(
        pod, inject_pod(pod, namespace="default", config=classic, bundle="").patch
    )
    injected["spec"]["containers"] = [
        c for c in injected["spec"]["containers"] if c["name"] == names.PROXY_CONTAINER
    ]
    assert injected["spec"]["containers"], "the classic-mode proxy is a regular container"
    status, answer = mutate(server, json.dumps(admission_review(injected)).encode())
    assert status == 200
    response = answer["response"]
    assert response["allowed"] is False
    assert response["status"]["code"] == 400
    assert "no application container" in response["status"]["message"]


def test_mutate_answers_other_methods_405(server: Serve) -> None:
    with server.client() as client:
        r = client.get("/mutate")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
