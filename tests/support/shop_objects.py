"""A small cluster for the discovery tests: namespace ``shop`` with Service ``cart``, its
EndpointSlice and two Pods, written as the API server holds them (with the fields the control
plane must drop)."""

from __future__ import annotations

from typing import Any

from tests.support.apiserver_standin import APIServerStandin

__all__ = ["cluster", "pod"]


def pod(name: str, ip: str, ns: str = "shop", **labels: str) -> dict[str, Any]:
    """A Pod as the API server holds it, with fields the control plane must not keep."""
    return {
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"app": "cart", **labels},
            "annotations": {
                "sidemesh.io/status": '{"version":"0.1.0"}',
                "sidemesh.io/trust-bundle": "-----BEGIN CERTIFICATE-----…",
                "kubectl.kubernetes.io/last-applied-configuration": "{…}",
            },
            "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
        },
        "spec": {
            "serviceAccountName": "cart",
            "nodeName": "node-1",
            "containers": [
                {
                    "name": "app",
                    "image": "cart:1",
                    "env": [{"name": "K", "value": "v"}],
                    "ports": [{"containerPort": 8080, "name": "http"}],
                },
            ],
        },
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "conditions": []},
    }


def cluster(api: APIServerStandin) -> None:
    """A namespace with one Service, its EndpointSlice and two Pods."""
    objs = api.objects
    objs.add({"kind": "Namespace", "metadata": {"name": "shop", "labels": {"a": "b"}}})
    objs.add(
        {
            "kind": "Service",
            "metadata": {"name": "cart", "namespace": "shop"},
            "spec": {
                "clusterIP": "10.96.0.10",
                "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
                "selector": {"app": "cart"},
            },
            "status": {"loadBalancer": {}},
        }
    )
    objs.add(
        {
            "kind": "EndpointSlice",
            "metadata": {
                "name": "cart-abc",
                "namespace": "shop",
                "labels": {"kubernetes.io/service-name": "cart"},
            },
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.1.0.1"], "conditions": {"ready": True},
                 "targetRef": {"kind": "Pod", "name": "cart-1", "namespace": "shop"}},
            ],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }
    )  # fmt: skip
    objs.add(pod("cart-1", "10.1.0.1"))
    objs.add(pod("cart-2", "10.1.0.2"))
