"""The Kubernetes source (list+watch into the ObjectStore) through the official client, against
the kube-apiserver STAND-IN (tests/support/standin_watch.py): no real API server exists here.
Timeouts below only bound how long a broken build hangs; nothing asserts on time."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.apiserver_standin import APIServerStandin
from tests.support.shop_objects import cluster, pod
from webhook.discovery.backoff import Backoff
from webhook.discovery.kubesource import KubeSource
from webhook.discovery.listwatch import KINDS, Expired, ListWatch
from webhook.discovery.store import ObjectStore
from webhook.kube.client import KubeClient

POD = next(k for k in KINDS if k.kind == "Pod")
FAST = Backoff(base=0.01, cap=0.04)


def client_for(api: APIServerStandin) -> KubeClient:
    return KubeClient.at(api.url, token=api.caller_token, ca_file=str(api.ca_file))


def wait_until(store: ObjectStore, check: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Wait for ``check()`` to hold, re-checked on every store change."""
    changed = threading.Condition()

    def poke(_keys: object) -> None:
        with changed:
            changed.notify_all()

    store.subscribe(poke)
    with changed:
        return changed.wait_for(check, timeout=timeout)


def names_of(store: ObjectStore, kind: str) -> list[str]:
    return [o["metadata"]["name"] for o in store.list(kind)]


@pytest.fixture
def make_source(standin: APIServerStandin) -> Iterator[Callable[..., KubeSource]]:
    started: list[KubeSource] = []

    def make(store: ObjectStore, **kwargs: Any) -> KubeSource:
        kwargs.setdefault("backoff", FAST)
        source = KubeSource(client_for(standin), store, rng=random.Random(7), **kwargs)
        started.append(source)
        source.start()
        return source

    yield make
    for source in started:
        source.stop()


# --- the stand-in itself, through the client's typed layer -------------------------------


def test_standin_list_and_watch_speak_like_the_api_server(standin: APIServerStandin) -> None:
    cluster(standin)
    lw = ListWatch(client_for(standin).api_client)
    listing = lw.list(POD, page_size=1)  # two pages, one snapshot
    assert [o["metadata"]["name"] for o in listing.items] == ["cart-1", "cart-2"]
    assert listing.resource_version == standin.objects.resource_version
    assert all(int(o["metadata"]["resourceVersion"]) > 1 for o in listing.items)
    with lw.watch(POD, listing.resource_version, 60) as stream:
        events = iter(stream)
        standin.objects.add(pod("cart-3", "10.1.0.3"))
        added = next(events)
        assert (added.type, added.object["metadata"]["name"]) == ("ADDED", "cart-3")
        assert added.object["kind"] == "Pod"
        standin.objects.delete("Pod", "shop", "cart-1")
        deleted = next(events)
        assert (deleted.type, deleted.object["metadata"]["name"]) == ("DELETED", "cart-1")
        assert int(deleted.resource_version) > int(added.resource_version)
        standin.objects.bookmark()
        mark = next(events)
        assert mark.type == "BOOKMARK" and mark.resource_version == deleted.resource_version
    standin.objects.compact()
    with pytest.raises(Expired, match="too old resource version"):
        list(lw.watch(POD, listing.resource_version, 60))
    raw = [r for r in standin.requests if "watch=" in r.path]
    assert "allowWatchBookmarks=true" in raw[0].path
    assert f"resourceVersion={listing.resource_version}" in raw[0].path


# --- the source ---------------------------------------------------------------------------------


def test_standin_store_converges_on_list(
    standin: APIServerStandin, make_source: Callable[..., KubeSource]
) -> None:
    cluster(standin)
    store = ObjectStore()
    source = make_source(store)
    assert asyncio.run(source.wait_synced(timeout=10))
    assert names_of(store, "Namespace") == ["shop"]
    assert names_of(store, "Service") == ["cart"]
    assert names_of(store, "EndpointSlice") == ["cart-abc"]
    assert names_of(store, "Pod") == ["cart-1", "cart-2"]
    kept = store.get("Pod", "shop", "cart-1")
    assert kept is not None
    assert kept["metadata"]["annotations"] == {"sidemesh.io/status": '{"version":"0.1.0"}'}
    assert "managedFields" not in kept["metadata"]
    assert kept["spec"]["containers"] == [
        {"name": "app", "ports": [{"containerPort": 8080, "name": "http"}]}
    ]
    assert kept["status"] == {
        "phase": "Running",
        "podIP": "10.1.0.1",
        "podIPs": [{"ip": "10.1.0.1"}],
    }
    assert (kept["kind"], kept["apiVersion"]) == ("Pod", "v1")  # list items carry neither
    slice_ = store.get("EndpointSlice", "shop", "cart-abc")
    assert slice_ is not None and slice_["apiVersion"] == "discovery.k8s.io/v1"
    assert slice_["endpoints"][0]["addresses"] == ["10.1.0.1"]
    assert source.status["Pod"].resource_version == standin.objects.resource_version


def test_standin_watch_events_apply(
    standin: APIServerStandin, make_source: Callable[..., KubeSource]
) -> None:
    cluster(standin)
    store = ObjectStore()
    source = make_source(store)
    assert asyncio.run(source.wait_synced(timeout=10))
    assert standin.objects.wait_for_watches(len(KINDS))
    standin.objects.add(pod("cart-3", "10.1.0.3"))
    standin.objects.modify(pod("cart-1", "10.1.0.9", version="2"))
    standin.objects.delete("Pod", "shop", "cart-2")
    standin.objects.add({"kind": "Namespace", "metadata": {"name": "pay"}})

    def applied() -> bool:
        one = store.get("Pod", "shop", "cart-1")
        return (
            names_of(store, "Pod") == ["cart-1", "cart-3"]
            and one is not None
            and one["status"]["podIP"] == "10.1.0.9"
            and names_of(store, "Namespace") == ["pay", "shop"]
        )

    assert wait_until(store, applied)
    assert all(s.lists == 1 for s in source.status.values())  # events, not relists


def test_standin_bookmarks_advance_the_resource_version(
    standin: APIServerStandin, make_source: Callable[..., KubeSource]
) -> None:
    cluster(standin)
    store = ObjectStore()
    source = make_source(store, kinds=(POD,))
    assert asyncio.run(source.wait_synced(timeout=10))
    assert standin.objects.wait_for_watches(1)
    listed = source.status["Pod"].resource_version
    # Other kinds move the cluster's version on; the Pod watch sees no event of its own ...
    standin.objects.add({"kind": "Namespace", "metadata": {"name": "pay"}})
    standin.objects.bookmark()
    now = standin.objects.resource_version
    assert source.wait(lambda: source.status["Pod"].resource_version == now, timeout=10)
    assert int(now) > int(listed)
    # ... and thanks to the bookmark, a watch cut after the history is compacted resumes
    # from a version still valid: no 410, no relist.
    standin.objects.compact()
    standin.objects.drop_watches()
    standin.objects.add(pod("cart-3", "10.1.0.3"))
    assert wait_until(store, lambda: "cart-3" in names_of(store, "Pod"))
    assert source.status["Pod"].relists_after_gone == 0
    assert source.status["Pod"].lists == 1


def test_standin_gone_relists_and_drops_what_was_deleted_meanwhile(
    standin: APIServerStandin, make_source: Callable[..., KubeSource]
) -> None:
    cluster(standin)
    store = ObjectStore()
    gate = threading.Event()
    asleep = threading.Event()

    def sleep(delay: float) -> None:  # the backoff wait, held until the test lets go
        asleep.set()
        gate.wait(10)

    source = make_source(store, kinds=(POD,), sleep=sleep)
    assert asyncio.run(source.wait_synced(timeout=10))
    assert standin.objects.wait_for_watches(1)
    standin.fail_next_lists = 1
    standin.objects.drop_watches()  # the watcher loses its connection and backs off ...
    assert asleep.wait(10)
    standin.objects.delete("Pod", "shop", "cart-2")  # ... while a Pod goes away
    standin.objects.add(pod("cart-3", "10.1.0.3"))
    standin.objects.compact()  # and the history it would have replayed is gone
    gate.set()
    assert wait_until(store, lambda: names_of(store, "Pod") == ["cart-1", "cart-3"])
    status = source.status["Pod"]
    assert status.relists_after_gone == 1 and status.lists == 2


def test_standin_dropped_connection_is_retried_with_backoff(
    standin: APIServerStandin, make_source: Callable[..., KubeSource]
) -> None:
    cluster(standin)
    store = ObjectStore()
    source = make_source(store, kinds=(POD,))
    assert asyncio.run(source.wait_synced(timeout=10))
    assert standin.objects.wait_for_watches(1)
    standin.fail_next_lists = 3  # the API server answers 500 three times more
    standin.objects.drop_watches()
    standin.objects.add(pod("cart-3", "10.1.0.3"))
    assert wait_until(store, lambda: "cart-3" in names_of(store, "Pod"))
    status = source.status["Pod"]
    assert status.retries == 4 and "500" in status.last_error
    ceilings = [0.01, 0.02, 0.04, 0.04]  # doubling, then capped
    assert all(c / 2 <= d <= c for c, d in zip(ceilings, status.retry_delays, strict=True))
    assert status.lists == 1 and status.relists_after_gone == 0  # resumed, not relisted
    assert status.failures_in_row == 0


def test_standin_bad_events_neither_crash_nor_lose_anything(
    standin: APIServerStandin, make_source: Callable[..., KubeSource]
) -> None:
    cluster(standin)
    store = ObjectStore()
    source = make_source(store, kinds=(POD,))
    assert asyncio.run(source.wait_synced(timeout=10))
    assert standin.objects.wait_for_watches(1)
    # An object nobody can key is skipped; the watch goes on.
    standin.objects.send_raw(b'{"type":"ADDED","object":{"kind":"Pod","metadata":{}}}\n')
    standin.objects.add(pod("cart-3", "10.1.0.3"))
    assert wait_until(store, lambda: "cart-3" in names_of(store, "Pod"))
    assert source.status["Pod"].retries == 0
    # A line that is not an event breaks the stream: backoff, then resume where it was.
    standin.objects.send_raw(b"<html>502 Bad Gateway</html>\n")
    standin.objects.delete("Pod", "shop", "cart-1")
    assert wait_until(store, lambda: names_of(store, "Pod") == ["cart-2", "cart-3"])
    status = source.status["Pod"]
    assert status.retries == 1 and "not a watch event" in status.last_error
    assert status.lists == 1


def test_standin_stop_is_prompt_even_mid_backoff(standin: APIServerStandin) -> None:
    cluster(standin)
    watching = KubeSource(client_for(standin), ObjectStore())
    watching.start()
    assert asyncio.run(watching.wait_synced(timeout=10))
    assert standin.objects.wait_for_watches(len(KINDS))
    watching.stop()  # every thread blocked in a watch read
    assert watching.stopped
    # A source waiting out a long backoff (15-30 s) stops at once too: stop() joins each
    # thread for at most 5 s, so "stopped" proves the wait was cut short.
    standin.fail_next_lists = 100
    backing_off = KubeSource(client_for(standin), ObjectStore(), backoff=Backoff(30, 60))
    backing_off.start()
    assert backing_off.wait(lambda: all(s.retries for s in backing_off.status.values()), 10)
    backing_off.stop()
    assert backing_off.stopped and not backing_off.synced()


def test_standin_run_is_cancellable(standin: APIServerStandin) -> None:
    cluster(standin)
    store = ObjectStore()
    source = KubeSource(client_for(standin), store)

    async def main() -> None:
        task = asyncio.create_task(source.run())
        assert await source.wait_synced(timeout=10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert source.stopped
    assert names_of(store, "Pod") == ["cart-1", "cart-2"]
