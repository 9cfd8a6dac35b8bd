"""Golden files: every case in tests/testdata/inject, and what must hold for each of them.

The expected files are what ``sidemesh inject`` (its own ``main()``, in-process) prints.

``UPDATE_GOLDEN=1`` (``make golden``) rewrites the expected files and deletes stale ones;
otherwise a difference, a missing expected file or a stale one fails.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
import jsonpointer
import pytest

from tests.conftest import UPDATE_GOLDEN
from tests.support.golden_cases import (
    DERIVED,
    GOLDEN_DIR,
    Case,
    cases,
    derived_input,
    normalise,
    pod_cases,
    run_case,
    validate_k8s,
)
from webhook.inject.pod import inject_pod
from webhook.inject.workloads import inject_object, uninject_object

CASES = cases()
IDS = [c.name for c in CASES]
SUCCESS = [c for c in CASES if c.expected_error() is None]


@pytest.mark.golden
@pytest.mark.parametrize("name", sorted(DERIVED))
def test_derived_inputs_are_current(name: str) -> None:
    """Inputs made by injecting another case must track what the injector writes today."""
    case = next(c for c in CASES if c.name == name)
    text = derived_input(case)
    if UPDATE_GOLDEN:
        if text != case.text:
            case.path.write_text(text)
        return
    assert case.text == text, f"{case.path.name} is stale (run make golden)"


@pytest.mark.golden
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_golden_output(case: Case) -> None:
    if UPDATE_GOLDEN and case.name in DERIVED:
        case = next(c for c in cases() if c.name == case.name)  # re-read: may just be rewritten
    outcome = run_case(case)
    assert outcome.exit_code == (1 if outcome.errors else 0)
    rendered = outcome.rendered(case)
    if UPDATE_GOLDEN:
        for other in (case.injected_file, case.patch_file, case.error_file):
            if other.name not in rendered and other.exists():
                other.unlink()
        for name, text in rendered.items():
            (GOLDEN_DIR / name).write_text(text)
        return
    for name, text in rendered.items():
        path = GOLDEN_DIR / name
        assert path.exists(), f"missing golden file {name} (run make golden)"
        assert path.read_text() == text, f"{name} differs (run make golden and review the diff)"


@pytest.mark.golden
def test_no_stale_golden_files() -> None:
    expected = {c.path.name for c in CASES}
    for case in CASES:
        expected |= set(run_case(case).rendered(case))
    present = {p.name for p in GOLDEN_DIR.iterdir() if p.is_file()}
    stale = sorted(present - expected)
    if UPDATE_GOLDEN:
        for name in stale:
            if not name.endswith(".yaml"):
                (GOLDEN_DIR / name).unlink()
        stale = [n for n in stale if n.endswith(".yaml")]
    assert not stale, f"golden files no case produces: {stale}"


def _templates(doc: Any) -> list[tuple[str, Any]]:
    """(pointer, pod template) of every template inside a document."""
    out: list[tuple[str, Any]] = []
    result = inject_object(copy.deepcopy(doc), namespace="x", config=CASES[0].config, bundle="b")
    for t in result.templates:
        out.append((t.path, jsonpointer.resolve_pointer(doc, t.path) if t.path else doc))
    return out


@pytest.mark.parametrize("case", SUCCESS, ids=[c.name for c in SUCCESS])
def test_invariants(case: Case) -> None:
    """Idempotent, reversible, patch applies, and the output is valid Kubernetes."""
    originals = case.input_documents()
    for original in originals:
        snapshot = copy.deepcopy(original)
        inject_object(original, namespace=case.namespace, config=case.config, bundle=case.bundle)
        assert original == snapshot, "the core modified its input"
    outcome = run_case(case)
    assert outcome.exit_code == 0
    assert len(outcome.documents) == len(originals), "same documents in, same documents out"
    by_doc: dict[int, list[dict[str, Any]]] = {}
    for entry in outcome.patches:
        by_doc.setdefault(entry["document"], []).append(entry)
    for original, injected in zip(originals, outcome.documents, strict=True):
        again = inject_object(
            injected, namespace=case.namespace, config=case.config, bundle=case.bundle
        )
        assert again.obj == injected, "inject(inject(x)) != inject(x)"
        assert all(t.patch == [] for t in again.templates), "re-injection must patch nothing"
        assert uninject_object(injected).obj == uninject_object(original).obj
        validate_k8s(injected)
    for entry in outcome.patches:
        doc = originals[_position(case, entry["document"])]
        pointer = entry["template"]
        before = jsonpointer.resolve_pointer(doc, pointer) if pointer else doc
        after_doc = outcome.documents[_position(case, entry["document"])]
        after = jsonpointer.resolve_pointer(after_doc, pointer) if pointer else after_doc
        assert jsonpatch.apply_patch(before, entry["patch"]) == after
        _assert_patch_shape(before, entry["patch"])
        # Cross-check with the library's diff: both describe the same change.
        assert jsonpatch.apply_patch(before, jsonpatch.make_patch(before, after).patch) == after


def _position(case: Case, index: int) -> int:
    """Position among the non-empty documents of the stream of the document with ``index``."""
    from webhook.manifests import iter_documents

    indices = [d.index for d in iter_documents(case.text) if d.data is not None]
    return indices.index(index)


def _assert_patch_shape(pod: Any, ops: list[dict[str, Any]]) -> None:
    """Arrays are inserted into, never replaced; managedFields never touched."""
    doc = copy.deepcopy(pod)
    for op in ops:
        path = op["path"]
        assert not path.startswith("/metadata/managedFields"), path
        if op["op"] in ("add", "replace") and isinstance(op["value"], list):
            existing = jsonpointer.resolve_pointer(doc, path, None)
            assert not existing, f"{op['op']} {path} would replace a non-empty array"
        doc = jsonpatch.apply_patch(doc, [op])


ERRORS = [c for c in CASES if c.expected_error() is not None]


@pytest.mark.parametrize("case", ERRORS, ids=[c.name for c in ERRORS])
def test_a_failing_stream_prints_nothing_and_exits_1(case: Case) -> None:
    """So ``sidemesh inject -f x | kubectl apply -f -`` never applies half a stream."""
    outcome = run_case(case)
    assert outcome.exit_code == 1 and outcome.stdout == ""
    assert outcome.errors


def test_pod_cases_match_the_core() -> None:
    """What the webhook's tests will send: each template alone, as a Pod, gives the patch."""
    from webhook.errors import InjectionError

    checked = 0
    for pc in pod_cases():
        if pc.error is not None:
            with pytest.raises(InjectionError) as info:
                inject_pod(pc.pod, namespace=pc.namespace, config=pc.config, bundle=pc.bundle)
            assert str(info.value) == pc.error
        else:
            got = inject_pod(pc.pod, namespace=pc.namespace, config=pc.config, bundle=pc.bundle)
            assert normalise(got.patch, pc.bundle) == pc.patch, (pc.case, pc.template)
            assert (got.decision.inject, got.decision.reason) == (pc.inject, pc.reason)
        checked += 1
    assert checked >= len(SUCCESS)


def test_the_golden_set_covers_every_kind_annotation_reason_and_mode() -> None:
    """Removing a case must not silently drop coverage of a user-visible behaviour."""
    from webhook.inject.annotations import ANNOTATIONS
    from webhook.inject.policy import REASONS
    from webhook.inject.workloads import TEMPLATE_PATHS

    texts = "\n".join(c.text for c in CASES)
    reasons = {e["decision"]["reason"] for c in SUCCESS for e in c.expected_patches() or []}
    kinds = {e["kind"] for c in SUCCESS for e in c.expected_patches() or []}
    assert set(REASONS) <= reasons, set(REASONS) - reasons
    assert set(TEMPLATE_PATHS) <= kinds, set(TEMPLATE_PATHS) - kinds
    missing = [a for a in ANNOTATIONS if a not in texts]
    assert not missing, missing
    for needle in (
        "kind: List",
        "hostNetwork: true",
        "kubernetes.io/config.mirror",
        "restartPolicy: Always",
        "grpc:",
        "tcpSocket:",
        "exec:",
        "httpGet:",
    ):
        assert needle in texts, needle  # fmt: skip
    assert sum(1 for c in CASES if c.expected_error() is not None) >= 10
