"""The admission engine without a server: what the API server gets back for each review."""

from __future__ import annotations

import base64
import copy
from typing import Any

import jsonpatch
import orjson
import pytest

from tests.support.webhook_https import V1, V1BETA1, admission_review, simple_pod
from webhook import names
from webhook.admission.review import Outcome, review
from webhook.config import MeshConfig
from webhook.errors import ReviewError
from webhook.inject.pod import inject_pod

CFG = MeshConfig()
BUNDLE = "-----BEGIN CERTIFICATE-----\nTEST\n-----END CERTIFICATE-----\n"
UID = "7f0c2a9e-0000-4000-8000-000000000001"


def core(pod: dict[str, Any], namespace: str) -> Any:
    return inject_pod(pod, namespace=namespace, config=CFG, bundle=BUNDLE)


def answer(doc: Any, **kwargs: Any) -> Outcome:
    return review(orjson.dumps(doc), injector=core, **kwargs)


def patched(doc: dict[str, Any], outcome: Outcome) -> dict[str, Any]:
    ops = orjson.loads(base64.b64decode(outcome.response["response"]["patch"]))
    result: dict[str, Any] = jsonpatch.apply_patch(doc["request"]["object"], ops)
    return result


@pytest.mark.parametrize("version", [V1, V1BETA1])
def test_pod_create_gets_a_json_patch_in_the_requests_version(version: str) -> None:
    doc = admission_review(simple_pod(), api_version=version)
    out = answer(doc)
    assert out.response["apiVersion"] == version
    assert out.response["kind"] == "AdmissionReview"
    resp = out.response["response"]
    assert (resp["uid"], resp["allowed"], resp["patchType"]) == (UID, True, "JSONPatch")
    expected = core(doc["request"]["object"], "default").pod
    assert patched(doc, out) == expected
    assert (out.result, out.reason, out.patch_ops) == (
        "injected",
        "namespace-policy",
        len(core(doc["request"]["object"], "default").patch),
    )
    assert resp["auditAnnotations"] == {"decision": "inject", "reason": "namespace-policy"}


def test_namespace_comes_from_the_request_when_the_pod_has_none() -> None:
    seen: list[str] = []

    def spy(pod: dict[str, Any], namespace: str) -> Any:
        seen.append(namespace)
        return core(pod, namespace)

    review(orjson.dumps(admission_review(simple_pod(), namespace="shop")), injector=spy)
    with_ns = simple_pod()
    with_ns["metadata"]["namespace"] = "billing"
    review(orjson.dumps(admission_review(with_ns, namespace="billing")), injector=spy)
    assert seen == ["shop", "billing"]
    # and a controller's pod, in an ignored namespace by the request alone, is skipped
    out = answer(admission_review(simple_pod(), namespace="kube-system"))
    assert (out.result, out.reason) == ("skipped", "ignored-namespace")


def test_the_pod_is_named_by_generate_name_in_logs() -> None:
    out = answer(admission_review(simple_pod()))
    assert out.pod == "web-5f7b9c-"
    named = simple_pod()
    named["metadata"]["name"] = "web-0"
    assert answer(admission_review(named)).pod == "web-0"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"kind": {"group": "apps", "version": "v1", "kind": "Deployment"}}, "not-a-pod"),
        ({"kind": {"group": "", "version": "v1", "kind": "Service"}}, "not-a-pod"),
        ({"sub_resource": "ephemeralcontainers", "operation": "UPDATE"}, "subresource"),
        ({"sub_resource": "exec", "operation": "CONNECT"}, "subresource"),
        ({"operation": "UPDATE"}, "not-create"),
        ({"operation": "DELETE"}, "not-create"),
    ],
)
def test_requests_that_are_not_a_pod_create_are_allowed_untouched(
    changes: dict[str, Any], reason: str
) -> None:
    out = answer(admission_review(simple_pod(), **changes))
    resp = out.response["response"]
    assert resp["uid"] == UID and resp["allowed"] is True
    assert "patch" not in resp and "patchType" not in resp
    assert resp["auditAnnotations"] == {"decision": "skip", "reason": reason}
    assert (out.result, out.reason) == ("skipped", reason)


def test_host_network_is_skipped_with_a_short_warning() -> None:
    out = answer(admission_review(simple_pod(hostNetwork=True)))
    resp = out.response["response"]
    assert resp["allowed"] is True and "patch" not in resp and "patchType" not in resp
    assert resp["auditAnnotations"] == {"decision": "skip", "reason": "host-network"}
    (warning,) = resp["warnings"]
    assert "hostNetwork" in warning and len(warning) <= 120


def test_opted_out_pods_are_skipped_without_a_warning() -> None:
    pod = simple_pod()
    pod["metadata"]["labels"][names.INJECT] = "false"
    resp = answer(admission_review(pod)).response["response"]
    assert resp["auditAnnotations"]["reason"] == "opted-out"
    assert "warnings" not in resp and "patch" not in resp


def test_an_injected_pod_gets_no_patch_and_no_patch_type() -> None:
    once = core(simple_pod(), "default").pod
    out = answer(admission_review(once))
    resp = out.response["response"]
    assert resp["allowed"] is True
    assert "patch" not in resp and "patchType" not in resp
    assert out.patch_ops == 0


def test_dry_run_gets_the_same_answer() -> None:
    wet = answer(admission_review(simple_pod()))
    dry = answer(admission_review(simple_pod(), dry_run=True))
    assert dry.response == wet.response
    assert dry.dry_run and not wet.dry_run


def test_a_bad_annotation_is_refused_naming_annotation_and_value() -> None:
    pod = simple_pod()
    pod["metadata"]["annotations"] = {"traffic.sidemesh.io/exclude-inbound-ports": "80,http"}
    out = answer(admission_review(pod))
    resp = out.response["response"]
    assert resp["uid"] == UID and resp["allowed"] is False
    assert "patch" not in resp
    assert resp["status"]["code"] == 400
    assert "traffic.sidemesh.io/exclude-inbound-ports" in resp["status"]["message"]
    assert "80,http" in resp["status"]["message"]
    assert (out.result, out.reason) == ("denied", "bad-annotation")


def test_a_conflict_is_refused_with_the_reason() -> None:
    pod = simple_pod()
    pod["spec"]["containers"][0]["ports"].append({"containerPort": 15090})
    out = answer(admission_review(pod))
    resp = out.response["response"]
    assert resp["allowed"] is False and resp["status"]["code"] == 400
    assert "15090" in resp["status"]["message"]
    assert out.reason == "conflict"


@pytest.mark.parametrize(
    ("obj", "namespace"),
    [
        (None, "default"),
        (["not", "a", "pod"], "default"),
        ({"metadata": "x"}, "default"),
        (simple_pod(), None),
        ({"spec": {"containers": "nope"}}, "default"),
    ],
)
def test_a_broken_object_is_refused_with_the_uid_not_a_crash(obj: Any, namespace: Any) -> None:
    out = answer(admission_review(obj, namespace=namespace))
    resp = out.response["response"]
    assert resp["uid"] == UID and resp["allowed"] is False
    assert resp["status"]["code"] == 400 and resp["status"]["message"]
    assert out.result == "denied"


def test_a_bug_in_the_core_is_a_refusal_with_code_500_and_keeps_the_error() -> None:
    def broken(pod: dict[str, Any], namespace: str) -> Any:
        raise RuntimeError("boom")

    out = review(orjson.dumps(admission_review(simple_pod())), injector=broken)
    resp = out.response["response"]
    assert resp["uid"] == UID and resp["allowed"] is False
    assert resp["status"]["code"] == 500 and "boom" not in resp["status"]["message"]
    assert isinstance(out.error, RuntimeError) and out.reason == "internal-error"


def _without(key: str) -> dict[str, Any]:
    doc = admission_review(simple_pod())
    del doc["request"][key]
    return doc


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        (b"", 400, "not-json"),
        (b"{not json", 400, "not-json"),
        (b"[]", 400, "not-a-review"),
        (b'"AdmissionReview"', 400, "not-a-review"),
        (orjson.dumps({"apiVersion": V1, "kind": "AdmissionReview"}), 400, "no-request"),
        (
            orjson.dumps({"apiVersion": V1, "kind": "AdmissionReview", "request": 3}),
            400,
            "no-request",
        ),
        (orjson.dumps(_without("uid")), 400, "no-uid"),
        (
            orjson.dumps({**admission_review(simple_pod()), "apiVersion": "admission.k8s.io/v2"}),
            400,
            "api-version",
        ),
        (orjson.dumps({**admission_review(simple_pod()), "kind": "Pod"}), 400, "not-a-review"),
    ],
)
def test_malformed_reviews_are_http_errors(body: bytes, status: int, reason: str) -> None:
    with pytest.raises(ReviewError) as info:
        review(body, injector=core)
    assert info.value.status == status
    assert getattr(info.value, "reason", None) == reason
    assert str(info.value)


def test_a_review_with_a_uid_but_a_bad_version_names_the_uid() -> None:
    doc = {**admission_review(simple_pod()), "apiVersion": "admission.k8s.io/v2"}
    with pytest.raises(ReviewError) as info:
        review(orjson.dumps(doc), injector=core)
    assert getattr(info.value, "uid", "") == UID


def test_content_type() -> None:
    body = orjson.dumps(admission_review(simple_pod()))
    with pytest.raises(ReviewError) as info:
        review(body, injector=core, content_type="text/plain")
    assert info.value.status == 415
    assert review(body, injector=core, content_type="application/json; charset=utf-8").uid == UID


def test_unknown_fields_of_the_pod_survive_the_patch() -> None:
    pod = simple_pod()
    pod["spec"]["containers"][0]["futureField"] = {"kept": [1, 2]}
    pod["spec"]["someNewSpecField"] = "x"
    doc = admission_review(pod)
    result = patched(doc, answer(copy.deepcopy(doc)))
    assert result["spec"]["someNewSpecField"] == "x"
    assert result["spec"]["containers"][0]["futureField"] == {"kept": [1, 2]}
