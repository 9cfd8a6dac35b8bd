"""The push engine without a network: what a proxy is sent, and when."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2

from tests.support.xds import delta_request as _request, drain as _drain
from webhook.discovery.compiler import CLUSTER, ENDPOINTS, LISTENER
from webhook.discovery.conn import ProxyConn
from webhook.discovery.core import Discovery, DiscoverySettings
from webhook.discovery.filesource import FileSource
from webhook.discovery.store import ObjectStore

BACKEND = "outbound|8080||backend.demo.svc.cluster.local"
DB = "outbound|3306||db.demo.svc.cluster.local"


def _setup(**settings: Any) -> tuple[ObjectStore, Discovery, ProxyConn]:
    store = ObjectStore()
    FileSource(store, None).load()
    d = Discovery(store, DiscoverySettings(**settings))
    d.start(asyncio.get_running_loop())
    conn = d.connect("spiffe://cluster.local/ns/demo/sa/frontend", "demo", "frontend-1", "t", "n")
    d.on_request(conn, _request(CLUSTER))
    d.on_request(conn, _request(ENDPOINTS, BACKEND, DB))
    d.on_request(conn, _request(LISTENER))
    return store, d, conn


def _more_backends(store: ObjectStore) -> None:
    slice_ = copy.deepcopy(store.get("EndpointSlice", "demo", "backend-abc12"))
    assert slice_ is not None
    slice_["endpoints"].append({"addresses": ["10.244.0.13"], "conditions": {"ready": True}})
    store.upsert(slice_)


def test_first_requests_get_everything_then_only_what_changed() -> None:
    async def run() -> None:
        store, d, conn = _setup()
        first = _drain(conn)
        assert [r.type_url for r in first] == [CLUSTER, ENDPOINTS, LISTENER]
        assert {r.name for r in first[0].resources} >= {BACKEND, DB, "passthrough"}
        for r in first:  # ACK everything
            d.on_request(conn, _request(r.type_url, nonce=r.nonce))
        _more_backends(store)
        await asyncio.sleep(0.05)  # endpoint changes are not debounced
        (resp,) = _drain(conn)
        assert resp.type_url == ENDPOINTS
        assert [r.name for r in resp.resources] == [BACKEND]  # not the db's, not the clusters
        assert conn.types[ENDPOINTS].pending == {
            resp.nonce: conn.types[ENDPOINTS].pending[resp.nonce]
        }

    asyncio.run(run())


def test_config_changes_are_debounced_into_one_push() -> None:
    async def run() -> None:
        store, d, conn = _setup(quiet=0.3, max_delay=5)
        _drain(conn)
        generation = d.generation
        for port in (81, 82, 83, 84, 85):  # a burst of Service edits
            svc = copy.deepcopy(store.get("Service", "demo", "backend"))
            assert svc is not None
            svc["spec"]["ports"].append({"name": f"p{port}", "port": port})
            store.upsert(svc)
        await asyncio.sleep(0)
        assert d.generation == generation  # nothing yet: waiting for quiet
        await asyncio.sleep(1.0)
        assert d.generation == generation + 1  # one rebuild for the burst
        names = {
            r.name for resp in _drain(conn) if resp.type_url == CLUSTER for r in resp.resources
        }
        assert "outbound|85||backend.demo.svc.cluster.local" in names

    asyncio.run(run())


def test_nacked_version_is_not_resent_and_removed_service_is_removed() -> None:
    async def run() -> None:
        store, d, conn = _setup(quiet=0.01)
        cds = _drain(conn)[0]
        nack = _request(CLUSTER, nonce=cds.nonce)
        nack.error_detail.message = "bad cluster"
        d.on_request(conn, nack)
        assert conn.types[CLUSTER].last_nack is not None
        d.rebuild("test")  # nothing changed: nothing is sent again
        assert _drain(conn) == []
        store.delete("Service", "demo", "db")
        await asyncio.sleep(0.3)
        removed = [name for r in _drain(conn) for name in r.removed_resources]
        assert DB in removed

    asyncio.run(run())


def test_a_pod_that_cannot_be_found_gets_nothing() -> None:
    async def run() -> None:
        store = ObjectStore()
        FileSource(store, None).load()
        d = Discovery(store, DiscoverySettings())
        d.start(asyncio.get_running_loop())
        assert await d.wait_for_pod("demo", "ghost", 0.05) is None
        assert await d.wait_for_pod("demo", "frontend-1", 0.05) is not None

    asyncio.run(run())


def test_scoped_sidecar_sees_its_namespace_and_declared_dependencies_only() -> None:
    async def run() -> None:
        store, _, conn = _setup(scoped=True, quiet=0.01)
        other = {
            "kind": "Service",
            "metadata": {"name": "ledger", "namespace": "finance"},
            "spec": {"clusterIP": "10.96.9.9", "ports": [{"name": "http", "port": 80}]},
        }
        store.upsert(other)
        await asyncio.sleep(0.3)
        ledger = "outbound|80||ledger.finance.svc.cluster.local"
        sent = {r.name for resp in _drain(conn) for r in resp.resources}
        assert BACKEND in sent and ledger not in sent
        pod = copy.deepcopy(store.get("Pod", "demo", "frontend-1"))
        assert pod is not None
        pod["metadata"]["annotations"]["sidemesh.io/dependencies"] = "finance/ledger"
        store.upsert(pod)
        await asyncio.sleep(0.3)
        assert ledger in {r.name for resp in _drain(conn) for r in resp.resources}

    asyncio.run(run())


def _learn_ranges(listener: Any) -> set[str]:
    """The address blocks the outbound listener's learn chains cover."""
    assert listener is not None
    return {
        f"{r.address_prefix}/{r.prefix_len.value}"
        for chain in listener.filter_chains
        if chain.name.startswith("outbound-learn")
        for r in chain.filter_chain_match.prefix_ranges
    }


def _outbound(responses: list[discovery_pb2.DeltaDiscoveryResponse]) -> Any:
    from envoy.config.listener.v3 import listener_pb2

    found = None
    for resp in responses:  # the last one sent
        for r in resp.resources:
            if r.name == "outbound":
                found = listener_pb2.Listener()
                r.resource.Unpack(found)
    return found


def test_scoped_sidecar_learns_an_undeclared_service_from_its_first_connection() -> None:
    """The first connection to a ClusterIP outside the scope asks for ``learn|ip:port`` on
    demand: the answer is an alias of that Service's cluster, and the scope grows by it."""

    async def run() -> None:
        store, d, conn = _setup(scoped=True, quiet=0.01)
        store.upsert(
            {
                "kind": "Service",
                "metadata": {"name": "ledger", "namespace": "finance"},
                "spec": {"clusterIP": "10.96.9.9", "ports": [{"name": "http", "port": 80}]},
            }
        )
        await asyncio.sleep(0.3)
        ledger = "outbound|80||ledger.finance.svc.cluster.local"
        before = _drain(conn)
        assert ledger not in {r.name for resp in before for r in resp.resources}
        # The block that holds the ClusterIP, not the address: the listener does not grow
        # with the number of Services.
        assert _learn_ranges(_outbound(before)) == {"10.96.0.0/16"}

        d.on_request(conn, _request(CLUSTER, "learn|10.96.9.9:80", nonce="x"))
        after = _drain(conn)
        sent = {r.type_url: {x.name for x in r.resources} for r in after}
        assert {"learn|10.96.9.9:80", ledger} <= sent[CLUSTER]
        assert ("finance", "ledger") in conn.learned
        # The next connection takes the Service's own chain: no learn chain is left for it.
        assert _learn_ranges(_outbound(after)) == set()
        alias = next(
            x for r in after if r.type_url == CLUSTER for x in r.resources if x.name.startswith("l")
        )
        from envoy.config.cluster.v3 import cluster_pb2

        cluster = cluster_pb2.Cluster()
        alias.resource.Unpack(cluster)
        assert cluster.eds_cluster_config.service_name == ledger  # the Service's endpoints

        # An address in the block that is no Service port is reached as before: passthrough.
        d.on_request(conn, _request(CLUSTER, "learn|10.96.9.9:81", nonce="y"))
        answered = [x for r in _drain(conn) if r.type_url == CLUSTER for x in r.resources]
        (other,) = [x for x in answered if x.name == "learn|10.96.9.9:81"]
        passthrough = cluster_pb2.Cluster()
        other.resource.Unpack(passthrough)
        assert passthrough.type == cluster_pb2.Cluster.ORIGINAL_DST
        # A name that is no address at all is answered as removed at once.
        d.on_request(conn, _request(CLUSTER, "learn|nowhere", nonce="z"))
        (resp,) = _drain(conn)
        assert list(resp.removed_resources) == ["learn|nowhere"]

    asyncio.run(run())
