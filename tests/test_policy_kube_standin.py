"""Access and rate-limit policies from the API server: the Kubernetes source lists and watches
AccessPolicy and RateLimitPolicy through the official client (CustomObjectsApi) against the
kube-apiserver STAND-IN, kept whole but slimmed. Timeouts only bound how long a broken build
hangs."""

from __future__ import annotations

import asyncio

from tests.support.apiserver_standin import APIServerStandin
from tests.support.kube_sources import source_on as _source, wait_for_store as _wait
from webhook.discovery.listwatch import KINDS
from webhook.discovery.store import ObjectStore
from webhook.policy.model import parse_policy

ACCESS = {
    "apiVersion": "sidemesh.io/v1alpha1",
    "kind": "AccessPolicy",
    "metadata": {"name": "cart", "namespace": "shop", "managedFields": [{"manager": "kubectl"}]},
    "spec": {
        "selector": {"matchLabels": {"app": "cart"}},
        "rules": [{"from": [{"namespace": "shop"}]}],
    },
}
LIMIT = {
    "apiVersion": "sidemesh.io/v1alpha1",
    "kind": "RateLimitPolicy",
    "metadata": {"name": "cart", "namespace": "shop"},
    "spec": {"limits": [{"requests": 5, "per": "minute"}]},
}


def test_policy_kinds_are_listed_and_watched(standin: APIServerStandin) -> None:
    standin.objects.add(ACCESS)
    store = ObjectStore()
    kinds = tuple(k for k in KINDS if k.kind in ("AccessPolicy", "RateLimitPolicy"))
    source = _source(standin, store, kinds)
    try:
        assert asyncio.run(source.wait_synced(timeout=10))
        (policy,) = store.list("AccessPolicy")
        assert "managedFields" not in policy["metadata"]
        assert parse_policy(policy).id == "shop/cart"  # what the compiler needs survived
        assert standin.objects.wait_for_watches(len(kinds))
        standin.objects.add(LIMIT)
        assert _wait(store, lambda: len(store.list("RateLimitPolicy")) == 1)
        standin.objects.delete("AccessPolicy", "shop", "cart")
        assert _wait(store, lambda: store.list("AccessPolicy") == [])
    finally:
        source.stop()
