"""The pure parts of the Kubernetes source: the backoff schedule and what is kept of objects."""

from __future__ import annotations

from importlib import resources
from typing import Any

import pytest

from webhook.config import MeshConfig
from webhook.discovery.backoff import Backoff
from webhook.discovery.build import build_model
from webhook.discovery.filesource import DEFAULT_MESH, parse_documents
from webhook.discovery.slim import slim
from webhook.inject.pod import inject_pod

BUNDLE = "-----BEGIN CERTIFICATE-----\nQUJD\n-----END CERTIFICATE-----\n"


def test_backoff_doubles_up_to_the_cap_with_jitter_in_the_upper_half() -> None:
    b = Backoff(base=1.0, cap=8.0)
    assert [b.delay(n, 0.0) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert [b.delay(n, 0.999) for n in (1, 4, 100)] == pytest.approx([1.0, 8.0, 8.0], abs=0.01)
    assert b.delay(10**6, 0.5) == 6.0  # no overflow, however long the outage


@pytest.mark.parametrize(("base", "cap"), [(0, 1), (-1, 1), (2, 1)])
def test_backoff_refuses_nonsense(base: float, cap: float) -> None:
    with pytest.raises(ValueError, match="0 < base <= cap"):
        Backoff(base, cap)


def test_slim_keeps_what_the_control_plane_reads_and_nothing_else() -> None:
    svc = {
        "metadata": {
            "name": "cart",
            "namespace": "shop",
            "resourceVersion": "7",
            "managedFields": [{"manager": "kubectl"}],
            "annotations": {
                "traffic.sidemesh.io/exclude-outbound-ports": "25",
                "evil.sidemesh.io.example.com/x": "no",
                "kubectl.kubernetes.io/last-applied-configuration": "{}",
            },
            "finalizers": ["x"],
        },
        "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}], "sessionAffinity": "None"},
        "status": {"loadBalancer": {}},
    }
    out = slim("Service", svc, "v1")
    assert out == {
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {
            "name": "cart",
            "namespace": "shop",
            "resourceVersion": "7",
            "annotations": {"traffic.sidemesh.io/exclude-outbound-ports": "25"},
        },
        "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]},
    }
    assert "managedFields" in svc["metadata"]  # type: ignore[operator]  # input unchanged
    ns = slim("Namespace", {"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": "a"},
                            "spec": {"finalizers": ["kubernetes"]}})  # fmt: skip
    assert ns == {"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": "a"}}


def test_slim_survives_odd_shapes() -> None:
    out = slim("Pod", {"metadata": {"name": "p"}, "spec": None, "status": "weird"}, "v1")
    assert out == {"kind": "Pod", "apiVersion": "v1", "metadata": {"name": "p"}, "spec": {},
                   "status": {}}  # fmt: skip
    assert slim("EndpointSlice", {"metadata": {"name": "s"}, "endpoints": None})["endpoints"] == []


def test_the_mesh_model_is_the_same_from_slimmed_objects() -> None:
    """Slimming drops nothing the control plane reads: the model built from the embedded demo
    mesh plus pods injected by the real injector (STRICT through the config, and through the
    annotation) is the same whether the objects were slimmed or not."""
    text = resources.files("webhook.samples").joinpath(DEFAULT_MESH).read_text("utf-8")
    objs = parse_documents(text, DEFAULT_MESH)
    strict = MeshConfig(inbound_mtls="STRICT")
    for i, (config, notes) in enumerate(
        [(strict, {}), (MeshConfig(), {"sidemesh.io/inbound-mtls": "STRICT"}), (MeshConfig(), {})]
    ):
        pod = {
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": {"name": f"p{i}", "namespace": "demo", "labels": {"app": "backend"},
                         "annotations": {**notes, "traffic.sidemesh.io/exclude-inbound-ports": "9"},
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"serviceAccountName": "sa", "containers": [
                {"name": "app", "image": "a:1", "ports": [{"containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": f"10.9.0.{i + 1}",
                       "podIPs": [{"ip": f"10.9.0.{i + 1}"}]},
        }  # fmt: skip
        objs.append(inject_pod(pod, namespace="demo", config=config, bundle=BUNDLE).pod)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for obj in objs:
        by_kind.setdefault(obj["kind"], []).append(obj)
    slimmed = {k: [slim(k, o, o.get("apiVersion", "")) for o in v] for k, v in by_kind.items()}
    full_model, slim_model = build_model(by_kind), build_model(slimmed)
    assert slim_model == full_model
    modes = {p.name: p.inbound_mtls for p in slim_model.pods.values() if p.name.startswith("p")}
    assert modes == {"p0": "STRICT", "p1": "STRICT", "p2": "PERMISSIVE"}
