"""The Kubernetes source: list+watch Namespaces, Services, EndpointSlices and Pods into the store.

One thread per kind (the official client is blocking; the threads never touch the event loop,
and the store is thread-safe), each running the loop every Kubernetes controller runs:

1. **list** (paged) and :meth:`~webhook.discovery.store.ObjectStore.replace` the kind with the
   result, so whatever was deleted while we were not watching disappears;
2. **watch** from the list's resourceVersion with bookmarks, applying each event with
   ``upsert``/``delete`` and remembering the resourceVersion of every event (bookmarks
   included), so a new watch resumes exactly where the last one stopped;
3. when the server ends a watch (its ``timeoutSeconds``, jittered so that watches do not all
   come back at once), watch again from the remembered version — no list;
4. when the version is too old (**410 Gone**), list again (step 1);
5. on any other error (connection refused or dropped, 5xx, 429, 403 …) wait — capped
   exponential backoff with jitter, see :mod:`webhook.discovery.backoff` — and watch again from
   the remembered version, or list when there is none yet.

Objects are cut down by :func:`webhook.discovery.slim.slim` on arrival. :meth:`KubeSource.stop`
closes every open watch (a blocked read returns at once) and wakes any backoff wait, then joins
the threads. For asyncio callers: ``await source.run()`` runs until cancelled, and
``await source.wait_synced()`` waits for the first list of every kind.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from webhook.discovery.backoff import Backoff
from webhook.discovery.listwatch import KINDS, Expired, KindSpec, ListWatch, WatchEvent
from webhook.discovery.slim import slim
from webhook.discovery.store import ObjectStore
from webhook.kube.client import KubeAPIError, KubeClient

__all__ = ["KindStatus", "KubeSource"]

log = logging.getLogger(__name__)

#: Server-side watch timeout range in seconds (each watch picks one at random).
WATCH_TIMEOUT = (300, 600)
DEFAULT_BACKOFF = Backoff()
#: Seconds between lists of an optional kind the API server does not serve (yet).
OPTIONAL_RECHECK = 30.0
#: How long :meth:`KubeSource.stop` waits for each thread.
STOP_TIMEOUT = 5.0


@dataclass
class KindStatus:
    """What a kind's watcher has done (read it for health and debugging; written by the
    watcher's thread only)."""

    synced: bool = False
    resource_version: str = ""
    lists: int = 0
    watches: int = 0
    relists_after_gone: int = 0
    retries: int = 0
    failures_in_row: int = 0
    last_error: str = ""
    retry_delays: list[float] = field(default_factory=list)


class KubeSource:
    """Feeds ``store`` from the API server ``kube`` talks to.

    ``sleep`` is the backoff's wait (default: wait on the stop signal, so stop ends it);
    ``rng`` the jitter's randomness; both are seams for tests.
    """

    def __init__(
        self,
        kube: KubeClient,
        store: ObjectStore,
        *,
        kinds: tuple[KindSpec, ...] = KINDS,
        backoff: Backoff = DEFAULT_BACKOFF,
        page_size: int = 500,
        watch_timeout: tuple[int, int] = WATCH_TIMEOUT,
        rng: random.Random | None = None,
        sleep: Callable[[float], object] | None = None,
    ) -> None:
        self._lw = ListWatch(kube.api_client)
        self._store = store
        self._kinds = kinds
        self._backoff = backoff
        self._page_size = page_size
        self._watch_timeout = watch_timeout
        self._rng = rng or random.Random()
        self._stopping = threading.Event()
        self._sleep = sleep or self._stopping.wait
        self._lock = threading.Lock()
        self._streams: set[Any] = set()
        self._threads: list[threading.Thread] = []
        self._synced = threading.Event()
        self._progress = threading.Condition()
        self.status = {spec.kind: KindStatus() for spec in kinds}

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        if self._threads:
            raise RuntimeError("KubeSource already started")
        for spec in self._kinds:
            thread = threading.Thread(
                target=self._run_kind, args=(spec,), name=f"kubesource-{spec.kind}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def stop(self) -> None:
        """Stop every watcher: open watches are closed, backoff waits end, threads joined."""
        self._stopping.set()
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            stream.close()
        for thread in self._threads:
            thread.join(STOP_TIMEOUT)
            if thread.is_alive():  # pragma: no cover - a list stuck in a slow API server
                log.warning("%s did not stop within %.0f s", thread.name, STOP_TIMEOUT)

    @property
    def stopped(self) -> bool:
        return all(not t.is_alive() for t in self._threads)

    def synced(self) -> bool:
        """Whether every kind has been listed once (the store holds a whole cluster view)."""
        return self._synced.is_set()

    def wait(self, check: Callable[[], bool], timeout: float | None = None) -> bool:
        """Block until ``check()`` holds, re-checked after every list, event (bookmarks
        included) and retry of any kind; False if ``timeout`` passed first."""
        with self._progress:
            return self._progress.wait_for(check, timeout)

    def _progressed(self) -> None:
        with self._progress:
            self._progress.notify_all()

    async def wait_synced(self, timeout: float | None = None) -> bool:
        return await asyncio.to_thread(self._synced.wait, timeout)

    async def run(self) -> None:
        """Start, then run until cancelled; cancelling stops the watchers."""
        self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.to_thread(self.stop)

    # --- one kind's loop ----------------------------------------------------------------------

    def _run_kind(self, spec: KindSpec) -> None:
        status = self.status[spec.kind]
        must_list = True  # nothing listed yet, or the version is Gone
        while not self._stopping.is_set():
            try:
                if must_list:
                    if not self._list(spec, status):
                        self._sleep(OPTIONAL_RECHECK)  # an optional CRD not installed (yet)
                        continue
                    must_list = False
                self._watch(spec, status)
            except Expired as exc:
                log.info("%s: %s; listing again", spec.kind, exc)
                status.relists_after_gone += 1
                must_list = True
            except KubeAPIError as exc:
                if self._stopping.is_set():
                    break
                status.failures_in_row += 1
                delay = self._backoff.delay(status.failures_in_row, self._rng.random())
                status.retries += 1
                status.last_error = str(exc)
                status.retry_delays.append(delay)
                self._progressed()
                log.warning(
                    "%s %s: %s; retrying in %.1f s%s",
                    "list" if must_list else "watch",
                    spec.resource,
                    exc,
                    delay,
                    _hint(exc, spec),
                )
                self._sleep(delay)
        log.debug("%s watcher stopped", spec.kind)

    def _list(self, spec: KindSpec, status: KindStatus) -> bool:
        """List and replace the kind; False when it is an optional kind the API server does
        not serve (its CRD is not installed): the store then holds none of it."""
        try:
            listing = self._lw.list(spec, page_size=self._page_size)
        except KubeAPIError as exc:
            if not (spec.optional and exc.status == 404):
                raise
            self._store.replace(spec.kind, [])
            if not status.synced:
                log.info(
                    "%s are not served (CRD not installed?): none until they are", spec.resource
                )
            self._mark_synced(status)
            return False
        objs = []
        for obj in listing.items:
            if _named(obj, spec):
                objs.append(slim(spec.kind, obj, spec.api_version))
        self._store.replace(spec.kind, objs)
        status.lists += 1
        status.resource_version = listing.resource_version
        self._mark_synced(status)
        log.info(
            "listed %d %s at resourceVersion %s", len(objs), spec.resource, listing.resource_version
        )
        return True

    def _mark_synced(self, status: KindStatus) -> None:
        if not status.synced:
            status.synced = True
            if all(s.synced for s in self.status.values()):
                self._synced.set()
        self._progressed()

    def _watch(self, spec: KindSpec, status: KindStatus) -> None:
        """One watch request from ``status.resource_version``, to its end, moving that version
        on with every event; a watch that delivers anything or ends cleanly resets the
        failure count."""
        timeout = self._rng.randint(*self._watch_timeout)
        stream = self._lw.watch(spec, status.resource_version, timeout)
        with self._lock:
            if self._stopping.is_set():
                stream.close()
                return
            self._streams.add(stream)
        status.watches += 1
        try:
            for event in stream:
                status.resource_version = self._apply(spec, event) or status.resource_version
                status.failures_in_row = 0
                self._progressed()
        finally:
            with self._lock:
                self._streams.discard(stream)
            stream.close()
        status.failures_in_row = 0

    def _apply(self, spec: KindSpec, event: WatchEvent) -> str:
        obj = event.object
        if event.type == "BOOKMARK":
            return event.resource_version
        if not _named(obj, spec):
            return event.resource_version
        if event.type == "DELETED":
            meta = obj["metadata"]
            self._store.delete(spec.kind, str(meta.get("namespace") or ""), str(meta["name"]))
        else:
            self._store.upsert(slim(spec.kind, obj, spec.api_version), spec.kind)
        return event.resource_version


def _named(obj: Any, spec: KindSpec) -> bool:
    """An object we can key: anything else is logged and skipped, never a crash."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    if isinstance(meta, dict) and isinstance(meta.get("name"), str) and meta["name"]:
        return True
    log.warning("skipping a %s without metadata.name: %.200r", spec.kind, obj)
    return False


def _hint(exc: KubeAPIError, spec: KindSpec) -> str:
    if exc.status == 403:
        return f" (the service account needs list and watch on {spec.resource})"
    if exc.status == 404:
        return f" (does this API server serve {spec.api_version}?)"
    return ""
