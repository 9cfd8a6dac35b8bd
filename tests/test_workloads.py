"""Pod templates are found in every workload kind; other kinds pass through untouched."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from webhook.config import MeshConfig
from webhook.errors import InjectionError
from webhook.inject.pod import is_injected
from webhook.inject.workloads import TEMPLATE_PATHS, check_object, inject_object, uninject_object

CFG = MeshConfig()


def template() -> dict[str, Any]:
    return {"metadata": {"labels": {"app": "x"}}, "spec": {"containers": [{"name": "x"}]}}


def wrap(kind: str) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": kind, "metadata": {"name": "w"}}
    if kind == "Pod":
        t = template()
        obj["metadata"].update(t["metadata"])
        obj["spec"] = t["spec"]
        return obj
    node = obj
    path = TEMPLATE_PATHS[kind]
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = template()
    return obj


def at(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        obj = obj[key]
    return obj


@pytest.mark.parametrize("kind", sorted(TEMPLATE_PATHS))
def test_every_workload_kind_gets_its_template_injected(kind: str) -> None:
    obj = wrap(kind)
    before = copy.deepcopy(obj)
    result = inject_object(obj, namespace="shop", config=CFG, bundle="pem")
    assert obj == before
    assert is_injected(at(result.obj, TEMPLATE_PATHS[kind]))
    [t] = result.templates
    assert (t.kind, t.name, t.namespace, t.decision.inject) == (kind, "w", "shop", True)
    if kind != "Pod":  # only the template changed, not the workload's own metadata
        assert result.obj["metadata"] == before["metadata"]
    assert uninject_object(result.obj).obj == before


def test_cronjob_annotations_go_on_the_pod_template_not_the_job_template() -> None:
    obj = wrap("CronJob")
    obj["spec"]["jobTemplate"]["metadata"] = {"labels": {"j": "1"}}
    out = inject_object(obj, namespace=None, config=CFG, bundle="pem").obj
    assert out["spec"]["jobTemplate"]["metadata"] == {"labels": {"j": "1"}}
    assert is_injected(out["spec"]["jobTemplate"]["spec"]["template"])


def test_namespace_is_the_objects_then_the_given_one_then_default() -> None:
    obj = wrap("Pod")
    assert inject_object(obj, namespace=None, config=CFG, bundle="p").templates[0].namespace == (
        "default"
    )
    assert (
        inject_object(obj, namespace="kube-system", config=CFG, bundle="p")
        .templates[0]
        .decision.reason
        == "ignored-namespace"
    )
    obj["metadata"]["namespace"] = "shop"
    result = inject_object(obj, namespace="kube-system", config=CFG, bundle="p")
    assert result.templates[0].namespace == "shop" and result.templates[0].decision.inject


def test_lists_recurse_and_keep_other_items_and_nulls() -> None:
    inner = {"apiVersion": "v1", "kind": "List", "items": [wrap("Job"), None]}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}}
    obj = {"apiVersion": "v1", "kind": "List", "items": [wrap("Deployment"), service, inner]}
    result = inject_object(obj, namespace="ns", config=CFG, bundle="p")
    assert [t.path for t in result.templates] == [
        "/items/0/spec/template",
        "/items/2/items/0/spec/template",
    ]
    assert result.obj["items"][1] is service
    assert result.obj["items"][2]["items"][1] is None
    assert result.passed_through == ["/items/1: Service s"]


@pytest.mark.parametrize("kind", ["Service", "ConfigMap", "Secret", "Namespace", "PodTemplate"])
def test_other_kinds_pass_through_unchanged(kind: str) -> None:
    obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": "n"}, "spec": {"x": 1}}
    result = inject_object(obj, namespace=None, config=CFG, bundle="p")
    assert result.obj is obj and result.templates == []
    assert result.passed_through == [f"{kind} n"]


def test_errors_name_the_object() -> None:
    obj = wrap("Deployment")
    obj["spec"]["template"]["metadata"]["annotations"] = {"sidemesh.io/proxy-cpu": "x"}
    with pytest.raises(InjectionError, match=r"^Deployment/w: annotation sidemesh.io/proxy-cpu"):
        inject_object(obj, namespace=None, config=CFG, bundle="p")
    broken = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "b"}}
    with pytest.raises(InjectionError, match=r"no pod template at spec\.template"):
        inject_object(broken, namespace=None, config=CFG, bundle="p")
    with pytest.raises(InjectionError, match=r"/items/0 is not an object"):
        inject_object({"kind": "List", "items": ["text"]}, namespace=None, config=CFG, bundle="p")


def test_check_reports_but_returns_the_input() -> None:
    obj = wrap("Pod")
    obj["metadata"]["annotations"] = {"sidemesh.io/log-level": "debug"}
    result = check_object(obj, namespace=None, config=CFG, bundle="p")
    assert result.obj is obj
    assert result.templates[0].read == ["annotation sidemesh.io/log-level"]
    assert result.templates[0].injected  # what it *would* be
