"""Traffic rules from the API server: the Kubernetes source lists and watches HTTPRoute,
GRPCRoute and TrafficPolicy through the official client (CustomObjectsApi) against the
kube-apiserver STAND-IN, and a cluster without these CRDs is not an error. Timeouts only bound
how long a broken build hangs."""

from __future__ import annotations

import asyncio

from tests.support.apiserver_standin import APIServerStandin
from tests.support.kube_sources import source_on as _source, wait_for_store as _wait
from webhook.discovery.listwatch import KINDS, KindSpec
from webhook.discovery.store import ObjectStore

ROUTE = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "HTTPRoute",
    "metadata": {
        "name": "web",
        "namespace": "shop",
        "creationTimestamp": "2026-01-01T00:00:00Z",
        "managedFields": [{"manager": "kubectl"}],
    },
    "spec": {
        "parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
        "rules": [{"backendRefs": [{"name": "web", "port": 80}]}],
    },
}
POLICY = {
    "apiVersion": "sidemesh.io/v1alpha1",
    "kind": "TrafficPolicy",
    "metadata": {"name": "web", "namespace": "shop"},
    "spec": {"targetRef": {"kind": "Service", "name": "web"}, "retries": {"attempts": 2}},
}


def test_rule_kinds_are_listed_and_watched(standin: APIServerStandin) -> None:
    standin.objects.add(ROUTE)
    store = ObjectStore()
    rules = tuple(k for k in KINDS if k.kind in ("HTTPRoute", "GRPCRoute", "TrafficPolicy"))
    source = _source(standin, store, rules)
    try:
        assert asyncio.run(source.wait_synced(timeout=10))
        (route,) = store.list("HTTPRoute")
        assert route["spec"] == ROUTE["spec"]  # kept whole ...
        assert "managedFields" not in route["metadata"]  # ... but slimmed
        assert standin.objects.wait_for_watches(len(rules))
        standin.objects.add(POLICY)
        assert _wait(store, lambda: len(store.list("TrafficPolicy")) == 1)
        standin.objects.delete("HTTPRoute", "shop", "web")
        assert _wait(store, lambda: store.list("HTTPRoute") == [])
    finally:
        source.stop()


def test_a_cluster_without_the_crd_syncs_with_none(standin: APIServerStandin) -> None:
    """An optional kind the API server does not serve (404) counts as listed and empty, so the
    control plane still starts; a required kind that 404s would keep it waiting."""
    missing = KindSpec(
        "Widget", "example.com/v1", "CustomObjectsApi", "list_cluster_custom_object",
        "widgets.example.com", ("example.com", "v1", "widgets"), optional=True,
    )  # fmt: skip
    store = ObjectStore()
    source = _source(standin, store, (missing,))
    try:
        assert asyncio.run(source.wait_synced(timeout=10))
        assert store.list("Widget") == []
        assert source.status["Widget"].synced and source.status["Widget"].retries == 0
    finally:
        source.stop()
    assert source.stopped  # the re-check wait ends at stop
