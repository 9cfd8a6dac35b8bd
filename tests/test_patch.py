"""JSON pointer escaping and the patch builder."""

from __future__ import annotations

import jsonpatch

from webhook.inject.patch import Patch, escape, pointer


def test_pointer_tokens_are_escaped_per_rfc6901() -> None:
    assert escape("sidemesh.io/status") == "sidemesh.io~1status"
    assert escape("a~b/c") == "a~0b~1c"  # "~" first, or "/" → "~1" → "~01"
    assert pointer("metadata", "annotations", "x/y~z") == "/metadata/annotations/x~1y~0z"
    assert pointer("spec", "containers", 0, "livenessProbe") == "/spec/containers/0/livenessProbe"
    assert pointer() == ""


def test_ops_apply_in_order_with_the_reference_implementation() -> None:
    doc = {"metadata": {"annotations": {"a/b": "1"}}, "spec": {"containers": [{"name": "x"}]}}
    p = Patch()
    p.add(pointer("metadata", "annotations", "c~d/e"), "2")
    p.add("/spec/containers/0", {"name": "first"})
    p.add("/spec/containers/-", {"name": "last"})
    p.replace(pointer("metadata", "annotations", "a/b"), "3")
    p.remove("/spec/containers/1")
    out = jsonpatch.apply_patch(doc, p.ops)
    assert out == {
        "metadata": {"annotations": {"a/b": "3", "c~d/e": "2"}},
        "spec": {"containers": [{"name": "first"}, {"name": "last"}]},
    }
    assert len(p) == 5
