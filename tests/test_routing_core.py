"""Traffic rules in the push engine, without a network: a rule change reaches the sidecars
that can call the Service it is about, and no other; scoping follows the routes."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2

from tests.conftest import TESTDATA
from tests.support.xds import drain as _drain
from webhook.discovery.compiler import CLUSTER, ENDPOINTS, LISTENER, ROUTE
from webhook.discovery.conn import ProxyConn
from webhook.discovery.core import Discovery, DiscoverySettings
from webhook.discovery.debug import rules_of
from webhook.discovery.filesource import parse_documents
from webhook.discovery.store import KINDS, ObjectStore

REVIEWS = "outbound|9080||reviews.shop.svc.cluster.local"
REVIEWS_V2 = "outbound|9080||reviews-v2.shop.svc.cluster.local"
SUBSET_V1 = "outbound|9080|v1|reviews.shop.svc.cluster.local"
TYPES = (CLUSTER, ENDPOINTS, LISTENER, ROUTE)


def _store() -> ObjectStore:
    store = ObjectStore()
    text = (TESTDATA / "routing" / "mesh.yaml").read_text()
    objs = parse_documents(text, "mesh.yaml")
    # A second namespace: a meshed pod that calls nothing of the shop.
    objs += [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}},
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "lonely",
                "namespace": "other",
                "annotations": {"sidemesh.io/status": "{}"},
            },
            "spec": {"serviceAccountName": "lonely"},
            "status": {"phase": "Running", "podIP": "10.244.2.1"},
        },
    ]
    for kind in KINDS:
        store.replace(kind, [o for o in objs if o["kind"] == kind])
    return store


def _connect(d: Discovery, namespace: str, pod: str) -> ProxyConn:
    conn = d.connect(f"spiffe://cluster.local/ns/{namespace}/sa/{pod}", namespace, pod, "t", "n")
    for type_url in TYPES:
        d.on_request(conn, discovery_pb2.DeltaDiscoveryRequest(type_url=type_url))
    for resp in _drain(conn):  # everything at first, ACKed
        d.on_request(
            conn,
            discovery_pb2.DeltaDiscoveryRequest(type_url=resp.type_url, response_nonce=resp.nonce),
        )
    return conn


def _names(responses: list[discovery_pb2.DeltaDiscoveryResponse]) -> set[str]:
    return {r.name for resp in responses for r in resp.resources}


def _edit(store: ObjectStore, kind: str, ns: str, name: str, change: Any) -> None:
    obj = copy.deepcopy(store.get(kind, ns, name))
    assert obj is not None
    change(obj)
    store.upsert(obj)


def test_a_policy_change_is_pushed_only_to_sidecars_that_see_the_service() -> None:
    async def run() -> None:
        store = _store()
        d = Discovery(store, DiscoverySettings(scoped=True, quiet=0.01))
        d.start(asyncio.get_running_loop())
        web, lonely = _connect(d, "shop", "web"), _connect(d, "other", "lonely")
        assert REVIEWS in web.scope and SUBSET_V1 in web.scope and REVIEWS not in lonely.scope

        def tighten(obj: Any) -> None:
            obj["spec"]["connectionPool"]["maxConnections"] = 5

        _edit(store, "TrafficPolicy", "shop", "reviews", tighten)
        await asyncio.sleep(0.3)
        pushed = _drain(web)
        # The Service's cluster and its subset clusters carry the policy: exactly those change.
        assert _names(pushed) == {
            REVIEWS,
            SUBSET_V1,
            "outbound|9080|v2|reviews.shop.svc.cluster.local",
        }
        assert _drain(lonely) == []  # not in its scope: no push at all

    asyncio.run(run())


def test_scope_follows_routes_to_their_backends() -> None:
    """A sidecar that declares it calls reviews also gets reviews-v2 (where the canary rule
    sends) and the subset clusters; without the rule it would see 500s for that share."""

    async def run() -> None:
        store = _store()

        def depend(obj: Any) -> None:
            obj["metadata"]["annotations"]["sidemesh.io/dependencies"] = "shop/reviews"

        _edit(store, "Pod", "other", "lonely", depend)
        d = Discovery(store, DiscoverySettings(scoped=True, quiet=0.01))
        d.start(asyncio.get_running_loop())
        lonely = _connect(d, "other", "lonely")
        assert {REVIEWS, REVIEWS_V2, SUBSET_V1} <= lonely.scope
        assert "outbound|50051||ratings.shop.svc.cluster.local" not in lonely.scope

    asyncio.run(run())


def test_a_rebuild_without_rule_changes_pushes_nothing_and_debug_shows_the_rules() -> None:
    async def run() -> None:
        store = _store()
        d = Discovery(store, DiscoverySettings(quiet=0.01))
        d.start(asyncio.get_running_loop())
        web = _connect(d, "shop", "web")
        d.rebuild("test")
        assert _drain(web) == []
        rules = rules_of(d)
        assert rules["routes"][REVIEWS][-1] == "HTTPRoute shop/reviews rules[4]"
        assert rules["policies"]["shop/reviews"] == "TrafficPolicy shop/reviews"
        assert rules["problems"] == {}

        def typo(obj: Any) -> None:
            obj["spec"]["rules"][4]["backendRefs"][1]["name"] = "reviews.v3"

        _edit(store, "HTTPRoute", "shop", "reviews", typo)
        await asyncio.sleep(0.3)
        (problem,) = rules_of(d)["problems"]["HTTPRoute shop/reviews"]
        assert "spec.rules[4].backendRefs[1].name" in problem and "no subset 'v3'" in problem
        # The rule still applies, with the unusable share answered 500.
        routes = [r for resp in _drain(web) for r in resp.resources]
        assert [r.name for r in routes] == [REVIEWS]

    asyncio.run(run())
