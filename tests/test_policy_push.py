"""The push engine and policies, without a network: a policy change reaches only the sidecars
of the workloads it selects, as filter configs (ECDS), never as a new listener."""

from __future__ import annotations

import asyncio

from tests.support.xds import delta_request as _request, drain as _drain
from webhook.discovery.compiler import CLUSTER, LISTENER
from webhook.discovery.conn import ProxyConn
from webhook.discovery.core import Discovery, DiscoverySettings
from webhook.discovery.filesource import FileSource
from webhook.discovery.store import ObjectStore
from webhook.policy.compiler import ECDS_NAMES
from webhook.policy.envoy import EXTENSION_CONFIG
from webhook.ratelimit.compiler import SLOTS

ALL_SLOTS = [*ECDS_NAMES["http"], *ECDS_NAMES["tcp"], *SLOTS]


def _connect(d: Discovery, pod: str, sa: str) -> ProxyConn:
    conn = d.connect(f"spiffe://cluster.local/ns/demo/sa/{sa}", "demo", pod, "t", "n")
    for type_url, names in ((CLUSTER, ()), (LISTENER, ()), (EXTENSION_CONFIG, ALL_SLOTS)):
        d.on_request(conn, _request(type_url, *names))
    for resp in _drain(conn):  # ACK the first config
        d.on_request(conn, _request(resp.type_url, nonce=resp.nonce))
    return conn


def test_a_policy_change_reaches_only_the_selected_workloads_sidecar() -> None:
    async def run() -> None:
        store = ObjectStore()
        FileSource(store, None).load()
        d = Discovery(store, DiscoverySettings(quiet=0.05))
        d.start(asyncio.get_running_loop())
        db, front = _connect(d, "db-0", "db"), _connect(d, "frontend-1", "frontend")
        store.upsert(
            {
                "apiVersion": "sidemesh.io/v1alpha1",
                "kind": "AccessPolicy",
                "metadata": {"name": "db-callers", "namespace": "demo"},
                "spec": {
                    "selector": {"matchLabels": {"app": "db"}},
                    "rules": [{"from": [{"serviceAccount": "backend"}]}],
                },
            }
        )
        await asyncio.sleep(0.3)  # past the debounce
        (resp,) = _drain(db)
        assert resp.type_url == EXTENSION_CONFIG  # no listener, no cluster
        assert sorted(r.name for r in resp.resources) == [
            "sidemesh.authz.http.allow",
            "sidemesh.authz.tcp.allow",
        ]
        assert _drain(front) == []  # not selected: nothing sent

    asyncio.run(run())
