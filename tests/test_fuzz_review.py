"""Fuzzing ``POST /mutate`` over HTTPS: random bodies, random JSON and mutated reviews.

Whatever arrives, the answer is a 2xx carrying a well-formed AdmissionReview (uid echoed,
patchType only with a patch that applies cleanly) or a 4xx with a JSON error and a specific
reason — never a 5xx, never a traceback, never a review refused as an internal error, and
never an exception reaching the server's generic handler (``sidemesh_unexpected_errors_total``
stays at 0).
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonpatch
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.support.webhook_https import (
    SAMPLE_REVIEW,
    V1,
    V1BETA1,
    Running,
    admission_review,
    https_webhook,
    simple_pod,
)
from webhook.admission.review import API_VERSIONS

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

SEEDS = [
    json.loads(SAMPLE_REVIEW.read_text()),
    admission_review(simple_pod()),
    admission_review(simple_pod(hostNetwork=True), api_version=V1BETA1),
    admission_review(simple_pod(), namespace=None),
]

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
#: Keys the webhook reads, so that mutations hit the interesting places often.
KEYS = [
    "apiVersion",
    "kind",
    "request",
    "uid",
    "operation",
    "object",
    "namespace",
    "metadata",
    "spec",
    "containers",
    "initContainers",
    "volumes",
    "annotations",
    "labels",
    "ports",
    "subResource",
    "dryRun",
    "name",
    "generateName",
    "hostNetwork",
    "securityContext",
    "sidemesh.io/inject",
    "sidemesh.io/status",
    "traffic.sidemesh.io/exclude-inbound-ports",
]


#: Reasons that only a generic handler gives: an exception nobody turned into a refusal.
GENERIC = {"unprocessable", "internal", "invalid", "internal-error"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with https_webhook(tmp_path_factory.mktemp("pki")) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: Running) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


@pytest.fixture(autouse=True)
def no_unexpected_errors(server: Running) -> Iterator[None]:
    yield
    unexpected = [
        (sample.labels, sample.value)
        for metric in server.metrics.unexpected.collect()
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.value
    ]
    assert not unexpected, f"exceptions reached a generic handler: {unexpected}"


def _nodes(doc: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _nodes(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _nodes(v, (*path, i))


@st.composite
def mutated_reviews(draw: st.DrawFn) -> Any:
    doc = copy.deepcopy(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        paths = list(_nodes(doc))
        path = draw(st.sampled_from(paths))
        if not path:
            continue
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        action = draw(st.sampled_from(["delete", "replace", "add", "retype"]))
        last = path[-1]
        if action == "delete":
            del parent[last]
        elif action == "replace":
            parent[last] = draw(json_values)
        elif action == "retype":
            parent[last] = draw(st.sampled_from([None, [], {}, "", 0, True, "CREATE", "Pod"]))
        elif isinstance(parent[last], dict):
            parent[last][draw(st.sampled_from(KEYS))] = draw(json_values)
        elif isinstance(parent[last], list):
            parent[last].append(draw(json_values))
    return doc


def check(client: httpx.Client, body: bytes, sent: Any = None) -> None:
    r = client.post("/mutate", content=body, headers={"content-type": "application/json"})
    assert r.status_code < 500, r.text
    answer = r.json()  # every answer is JSON, errors included
    if r.status_code >= 400:
        assert set(answer) >= {"error", "message"}, answer
        assert answer["error"] not in GENERIC, answer
        return
    assert r.status_code == 200
    assert answer["kind"] == "AdmissionReview" and answer["apiVersion"] in API_VERSIONS
    assert answer["apiVersion"] == sent["apiVersion"]
    resp = answer["response"]
    assert resp["uid"] == sent["request"]["uid"]
    assert isinstance(resp["allowed"], bool)
    assert ("patch" in resp) == ("patchType" in resp)
    if "patch" in resp:
        assert resp["allowed"] is True and resp["patchType"] == "JSONPatch"
        ops = json.loads(base64.b64decode(resp["patch"]))
        assert ops, "never a patchType with an empty patch"
        jsonpatch.apply_patch(sent["request"]["object"], ops)  # the patch applies cleanly
    if not resp["allowed"]:
        assert resp["status"]["code"] == 400, resp  # 500 here would be a bug in the core
        assert resp["status"]["reason"] == "BadRequest", resp
        assert resp["status"]["message"]
    for warning in resp.get("warnings", []):
        assert len(warning) <= 120


@FUZZ
@given(body=st.binary(max_size=512))
def test_random_bytes(client: httpx.Client, body: bytes) -> None:
    r = client.post("/mutate", content=body, headers={"content-type": "application/json"})
    assert r.status_code < 500
    assert r.json().get("error") not in GENERIC, r.text
    if r.status_code == 200:
        check(client, body, json.loads(body))


@FUZZ
@given(doc=json_values)
def test_random_json(client: httpx.Client, doc: Any) -> None:
    check(client, json.dumps(doc).encode(), doc)


@settings(FUZZ, max_examples=400)
@given(doc=mutated_reviews())
def test_mutated_reviews(client: httpx.Client, doc: Any) -> None:
    check(client, json.dumps(doc).encode(), doc)


@FUZZ
@given(
    version=st.sampled_from([V1, V1BETA1]),
    operation=st.sampled_from(["CREATE", "UPDATE", "DELETE", "CONNECT"]),
    sub=st.sampled_from([None, "", "status", "exec", "ephemeralcontainers"]),
    dry_run=st.booleans(),
    obj=json_values,
)
def test_random_objects_in_valid_envelopes(
    client: httpx.Client, version: str, operation: str, sub: str | None, dry_run: bool, obj: Any
) -> None:
    doc = admission_review(
        obj, api_version=version, operation=operation, sub_resource=sub, dry_run=dry_run
    )
    check(client, json.dumps(doc).encode(), doc)
