"""The control plane's Kubernetes source against the API-server stand-in, for tests of the
kinds it lists and watches (traffic rules, access policy …)."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable

from tests.support.apiserver_standin import APIServerStandin
from webhook.discovery.backoff import Backoff
from webhook.discovery.core import Discovery, DiscoverySettings
from webhook.discovery.kubesource import KubeSource
from webhook.discovery.listwatch import KindSpec
from webhook.discovery.store import ObjectStore
from webhook.kube.client import KubeClient
from webhook.routing.statuswriter import StatusWriter

__all__ = ["source_on", "wait_for_store", "write_status_once"]


def source_on(api: APIServerStandin, store: ObjectStore, kinds: tuple[KindSpec, ...]) -> KubeSource:
    """A started source for ``kinds``, with fast, seeded backoff."""
    client = KubeClient.at(api.url, token=api.caller_token, ca_file=str(api.ca_file))
    source = KubeSource(
        client, store, kinds=kinds, backoff=Backoff(base=0.01, cap=0.04), rng=random.Random(3)
    )
    source.start()
    return source


def wait_for_store(store: ObjectStore, check: Callable[[], bool]) -> bool:
    """Wait (10 s at most) until ``check()`` holds, re-checking on every store change."""
    changed = threading.Condition()

    def poke(_keys: object) -> None:
        with changed:
            changed.notify_all()

    store.subscribe(poke)
    with changed:
        return changed.wait_for(check, timeout=10)


def write_status_once(api: APIServerStandin, settings: DiscoverySettings, now: str) -> int:
    """The control plane's status writer against ``api``: its objects listed and watched by a
    real source, one pass of writes at time ``now``, then a wait until every write has come
    back as a watch event (nothing left pending). Returns how many objects it wrote."""
    kube = KubeClient.at(api.url, token=api.caller_token, ca_file=str(api.ca_file))
    store = ObjectStore()
    source = KubeSource(kube, store, backoff=Backoff(base=0.01, cap=0.04), rng=random.Random(5))
    source.start()

    async def run() -> int:
        assert await source.wait_synced(timeout=10)
        d = Discovery(store, settings)
        d.start(asyncio.get_running_loop())
        writer = StatusWriter(kube, d, clock=lambda: now)
        written = await writer.write_once()
        for _ in range(100):
            if not writer.pending():
                break
            await asyncio.sleep(0.05)
        assert writer.pending() == []
        return written

    try:
        return asyncio.run(run())
    finally:
        source.stop()
