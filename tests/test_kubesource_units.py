"""The pure parts of the Kubernetes source: the backoff schedule and what is kept of objects."""

from __future__ import annotations

import pytest

from webhook.discovery.backoff import Backoff
from webhook.discovery.slim import slim


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
    assert "managedFields" in svc["metadata"]  # the input is not changed
    ns = slim("Namespace", {"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": "a"},
                            "spec": {"finalizers": ["kubernetes"]}})  # fmt: skip
    assert ns == {"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": "a"}}


def test_slim_survives_odd_shapes() -> None:
    out = slim("Pod", {"metadata": {"name": "p"}, "spec": None, "status": "weird"}, "v1")
    assert out == {"kind": "Pod", "apiVersion": "v1", "metadata": {"name": "p"}, "spec": {},
                   "status": {}}  # fmt: skip
    assert slim("EndpointSlice", {"metadata": {"name": "s"}, "endpoints": None})["endpoints"] == []
