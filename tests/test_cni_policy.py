"""CNI mode's promise, checked with the same Pod Security ``restricted`` checker as the control
plane's manifests: a pod injected in CNI mode passes it, one injected in classic mode does not
(its ``sidemesh-init`` adds NET_ADMIN and NET_RAW and runs as root), so the docs can say which
mode a namespace that enforces ``restricted`` (or ``baseline``) needs."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from tests.support.pod_security import restricted_violations
from webhook import names
from webhook.config import MeshConfig
from webhook.errors import AnnotationError
from webhook.inject.pod import inject_pod, uninject_pod

#: An app that follows ``restricted`` itself (the injector cannot make an app compliant).
RESTRICTED_APP: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "web", "namespace": "shop"},
    "spec": {
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000},
        "containers": [
            {
                "name": "app",
                "image": "registry.example/app:1",
                "ports": [{"containerPort": 8080}],
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"]},
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
            }
        ],
    },
}


def injected(*, cni: bool, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    pod = copy.deepcopy(RESTRICTED_APP)
    if annotations:
        pod["metadata"]["annotations"] = annotations
    result = inject_pod(pod, namespace="shop", config=MeshConfig(cni=cni), bundle="PEM")
    assert result.decision.inject
    return result.pod


def test_the_app_alone_is_restricted() -> None:
    assert restricted_violations(RESTRICTED_APP["spec"]) == []


@pytest.mark.parametrize("native", ["true", "false"])
def test_cni_mode_pod_passes_restricted(native: str) -> None:
    pod = injected(cni=True, annotations={"sidemesh.io/native-sidecar": native})
    assert restricted_violations(pod["spec"]) == []
    inits = [c["name"] for c in pod["spec"]["initContainers"]]
    assert inits[0] == names.VALIDATE_CONTAINER
    assert names.INIT_CONTAINER not in inits


def test_classic_mode_pod_is_reported_as_failing_restricted() -> None:
    bad = restricted_violations(injected(cni=False)["spec"])
    assert "sidemesh-init: adds capabilities ['NET_ADMIN', 'NET_RAW']" in bad
    assert "sidemesh-init: runAsUser 0" in bad
    assert "sidemesh-init: runAsNonRoot is not true" in bad


def test_the_per_pod_annotation_overrides_the_mesh_config() -> None:
    classic = injected(cni=True, annotations={"sidemesh.io/cni": "false"})
    assert classic["spec"]["initContainers"][0]["name"] == names.INIT_CONTAINER
    assert names.CNI_CAPTURE not in classic["metadata"]["annotations"]
    cni = injected(cni=False, annotations={"sidemesh.io/cni": "true"})
    assert cni["spec"]["initContainers"][0]["name"] == names.VALIDATE_CONTAINER
    assert restricted_violations(cni["spec"]) == []


def test_bad_cni_annotation_names_the_annotation_and_value() -> None:
    with pytest.raises(AnnotationError) as info:
        injected(cni=False, annotations={"sidemesh.io/cni": "sometimes"})
    assert "sidemesh.io/cni" in str(info.value) and "sometimes" in str(info.value)


def test_plugin_and_validate_get_the_init_containers_arguments() -> None:
    """One list of init-traffic arguments feeds both halves of CNI mode, and it is the list
    the classic init container would run with: the same rules either way."""
    annotations = {"traffic.sidemesh.io/exclude-outbound-ports": "5432"}
    cni = injected(cni=True, annotations=annotations)
    classic = injected(cni=False, annotations=annotations)
    init_args = classic["spec"]["initContainers"][0]["args"]
    assert cni["spec"]["initContainers"][0]["args"] == init_args
    assert json.loads(cni["metadata"]["annotations"][names.CNI_CAPTURE]) == init_args


def test_switching_modes_reinjects_and_uninject_restores() -> None:
    cni = injected(cni=True)
    again = inject_pod(cni, namespace="shop", config=MeshConfig(cni=False), bundle="PEM").pod
    assert again["spec"]["initContainers"][0]["name"] == names.INIT_CONTAINER
    assert names.CNI_CAPTURE not in again["metadata"]["annotations"]
    assert uninject_pod(cni) == RESTRICTED_APP


def test_check_does_not_call_the_capture_annotation_unknown() -> None:
    from webhook.inject.annotations import UNKNOWN_MARK, sidemesh_keys

    pod = injected(cni=True)
    keys = sidemesh_keys({}, pod["metadata"]["annotations"])
    assert f"annotation {names.CNI_CAPTURE}" in keys
    assert not [k for k in keys if k.endswith(UNKNOWN_MARK)], keys
