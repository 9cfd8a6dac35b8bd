"""Linkerd's `linkerd inject` test inputs through `sidemesh inject`: a real-world corpus.

Every file must come out injected and valid Kubernetes, pass through with a reason, or fail
with a clear error — never a traceback. The expected outcome of each file is listed, so a
change of behaviour shows up as a failure rather than as a quietly different outcome.
"""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml

from tests.support.golden_cases import BUNDLE, validate_k8s
from webhook.cli.main import main
from webhook.inject.pod import is_injected
from webhook.inject.workloads import TEMPLATE_PATHS
from webhook.manifests import read_documents

CORPUS = Path(__file__).resolve().parent / "testdata" / "inject" / "corpus" / "linkerd"

# file → expected outcome: "injected" (every workload), a skip reason, "passed-through", or
# "error: <text the message must contain>".
EXPECTED = {
    "inject_contour.input.yml": "injected",
    "inject_emojivoto_already_injected.input.yml": "injected",  # Linkerd's sidecar is opaque
    "inject_emojivoto_cronjob.input.yml": "injected",
    "inject_emojivoto_cronjob_nometa.input.yml": "injected",
    "inject_emojivoto_deployment.input.yml": "injected",
    "inject_emojivoto_deployment_automountServiceAccountToken_false.input.yml": "injected",
    "inject_emojivoto_deployment_capabilities.input.yml": "injected",
    "inject_emojivoto_deployment_config_overrides.input.yml": "injected",
    "inject_emojivoto_deployment_controller_name.input.yml": "injected",
    "inject_emojivoto_deployment_empty_resources.input.yml": "injected",
    "inject_emojivoto_deployment_hostNetwork_false.input.yml": "injected",
    "inject_emojivoto_deployment_hostNetwork_true.input.yml": "skipped (host-network)",
    "inject_emojivoto_deployment_injectDisabled.input.yml": "injected",  # linkerd.io/inject
    "inject_emojivoto_deployment_udp.input.yml": "injected",
    "inject_emojivoto_deployment_uninjected.input.yml": "injected",
    "inject_emojivoto_istio.input.yml": "injected",
    "inject_emojivoto_list.input.yml": "injected",
    "inject_emojivoto_list_empty_resources.input.yml": "injected",
    "inject_emojivoto_namespace_good.input.yml": "passed through (not-a-workload)",
    "inject_emojivoto_pod.input.yml": "injected",
    "inject_emojivoto_pod_with_requests.input.yml": "injected",
    "inject_emojivoto_statefulset.input.yml": "injected",
    "inject_gettest_deployment.bad.input.yml": "error: document 1: invalid YAML at line 36",
    "inject_gettest_deployment.good.input.yml": "injected",
    "inject_tap_deployment.input.yml": "injected",
}


def test_every_corpus_file_has_an_expected_outcome() -> None:
    assert sorted(p.name for p in CORPUS.glob("*.yml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus_file(name: str, tmp_path: Path) -> None:
    path = CORPUS / name
    bundle = tmp_path / "ca.crt"
    bundle.write_text(BUNDLE)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["inject", "-f", str(path), "--bundle", str(bundle)])
    report = err.getvalue()
    assert "Traceback" not in report
    expected = EXPECTED[name]
    if expected.startswith("error: "):
        assert code == 1 and out.getvalue() == ""
        assert expected.removeprefix("error: ") in report
        return
    assert code == 0, report
    lines = [ln for ln in report.splitlines() if ln.startswith("document ")]
    assert lines and all(ln.endswith(expected) or expected in ln for ln in lines), report
    documents = [d for d in yaml.safe_load_all(out.getvalue()) if d is not None]
    inputs = [d.data for d in read_documents(path.read_text()) if d.data is not None]
    assert len(documents) == len(inputs)
    for before, doc in zip(inputs, documents, strict=True):
        # The whole object must be valid when its input was (one corpus Deployment has no
        # selector); the pod templates, which sidemesh wrote, must be valid in every case.
        if _valid(before):
            validate_k8s(doc)
        for template in _templates(doc):
            validate_k8s({"apiVersion": "v1", "kind": "Pod", **template})
            assert is_injected(template) == (expected == "injected")


def _valid(doc: object) -> bool:
    try:
        validate_k8s(doc)
    except AssertionError:
        return False
    return True


def _templates(doc: dict) -> list[dict]:  # type: ignore[type-arg]
    if doc.get("kind") == "List":
        return [t for item in doc["items"] if item for t in _templates(item)]
    if doc.get("kind") not in TEMPLATE_PATHS:
        return []
    node = doc
    for key in TEMPLATE_PATHS[doc["kind"]]:
        node = node[key]
    return [node]
