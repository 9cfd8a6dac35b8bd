"""The decision order (webhook/inject/policy.py), first match wins, with stable reasons."""

from __future__ import annotations

from typing import Any

import pytest

from webhook.config import MeshConfig, load_config
from webhook.errors import AnnotationError
from webhook.inject.policy import REASONS, Decision, decide

CFG = MeshConfig()


def pod(labels: dict[str, Any] | None = None, annotations: dict[str, Any] | None = None,
        host_network: bool | None = None) -> dict[str, Any]:  # fmt: skip
    spec: dict[str, Any] = {"containers": [{"name": "app", "image": "x"}]}
    if host_network is not None:
        spec["hostNetwork"] = host_network
    return {"metadata": {"labels": labels or {}, "annotations": annotations or {}}, "spec": spec}


@pytest.mark.parametrize(
    ("the_pod", "namespace", "expected"),
    [
        (pod(), "shop", Decision(True, "namespace-policy")),
        (pod(host_network=True, labels={"sidemesh.io/inject": "true"}), "shop",
         Decision(False, "host-network")),
        (pod(host_network=False), "shop", Decision(True, "namespace-policy")),
        (pod(annotations={"kubernetes.io/config.mirror": "x"},
             labels={"sidemesh.io/inject": "true"}), "shop", Decision(False, "mirror-pod")),
        (pod(labels={"sidemesh.io/inject": "true"}), "kube-system",
         Decision(False, "ignored-namespace")),
        (pod(), "sidemesh-system", Decision(False, "ignored-namespace")),
        (pod(labels={"sidemesh.io/inject": "false"}), "shop", Decision(False, "opted-out")),
        (pod(annotations={"sidemesh.io/inject": "false"}), "shop", Decision(False, "opted-out")),
        (pod(labels={"sidemesh.io/inject": "true"}, annotations={"sidemesh.io/inject": "false"}),
         "shop", Decision(True, "opted-in")),
        (pod(labels={"sidemesh.io/inject": "enabled"}), "shop", Decision(True, "opted-in")),
    ],
)  # fmt: skip
def test_decision_order(the_pod: dict[str, Any], namespace: str, expected: Decision) -> None:
    assert decide(the_pod, namespace, CFG) == expected
    assert expected.reason in REASONS


def test_ignored_namespaces_come_from_the_config() -> None:
    cfg = load_config({"ignored_namespaces": ["legacy"]})
    assert decide(pod(), "legacy", cfg) == Decision(False, "ignored-namespace")
    assert decide(pod(), "kube-system", cfg) == Decision(True, "namespace-policy")


@pytest.mark.parametrize(
    ("labels", "annotations", "message"),
    [
        ({"sidemesh.io/inject": "perhaps"}, {}, "label sidemesh.io/inject='perhaps'"),
        ({}, {"sidemesh.io/inject": True}, "annotation sidemesh.io/inject='true'"),
    ],
)
def test_a_bad_opt_in_value_is_an_error_naming_it(
    labels: dict[str, Any], annotations: dict[str, Any], message: str
) -> None:
    with pytest.raises(AnnotationError) as info:
        decide(pod(labels, annotations), "shop", CFG)
    assert message in str(info.value)


def test_a_template_without_metadata_or_spec_is_decided_not_crashed() -> None:
    assert decide({}, "shop", CFG) == Decision(True, "namespace-policy")
