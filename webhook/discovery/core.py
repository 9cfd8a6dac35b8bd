"""The push engine: store → model → encoded resources → each connected proxy's delta.

Runs on one asyncio loop. Sources call the store from their own threads; the store's listener
hops onto the loop. Endpoint changes (EndpointSlices) are pushed at once; every other change is
debounced (``quiet`` seconds without a new event, at most ``max_delay`` after the first) so a
rollout of a hundred pods costs a handful of pushes, not a hundred.

Per push, a proxy gets — in the order Envoy needs to never route to a missing cluster — CDS,
then EDS, then LDS, each only with what changed for it: the shared tables' change logs, the
change of its scope, and its own few per-proxy resources. The shared tables are
:mod:`webhook.discovery.shared`; a proxy's scope and own resources, :mod:`webhook.discovery.views`;
a stream's state and what one push of one type sends it, :mod:`webhook.discovery.conn`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from envoy.service.discovery.v3 import discovery_pb2

from webhook import names
from webhook.config import DEFAULTS, Ports, TelemetryConfig
from webhook.dataplane.bootstrap import BootstrapOptions
from webhook.discovery import compiler as cc, metrics
from webhook.discovery.build import build_model, update_endpoints
from webhook.discovery.conn import ProxyConn, type_delta
from webhook.discovery.learn import LEARN_PREFIX
from webhook.discovery.model import PodInfo
from webhook.discovery.objects import slice_service
from webhook.discovery.parsecache import ParseCache
from webhook.discovery.resources import Encoded, delta_response
from webhook.discovery.shared import SharedResources
from webhook.discovery.store import KINDS, Key, ObjectStore, key_of
from webhook.discovery.tables import NackRecord, TypeState
from webhook.discovery.views import ProxyViews, proxy_options
from webhook.policy.envoy import EXTENSION_CONFIG
from webhook.policy.model import KIND as ACCESS_POLICY
from webhook.policy.state import AuthzState
from webhook.ratelimit.model import KIND as RATE_LIMIT_POLICY
from webhook.routing.table import EMPTY, RoutingTable, build_table

__all__ = ["PUSH_ORDER", "Discovery", "DiscoverySettings"]

LOG = logging.getLogger("sidemesh.discovery")

#: Make before break: clusters, then their endpoints, then the listeners that use them, then
#: the routes those listeners ask for (Envoy's own order); access-policy filter configs (ECDS)
#: last: the listeners name them and Envoy asks for them.
PUSH_ORDER = (cc.CLUSTER, cc.ENDPOINTS, cc.LISTENER, cc.ROUTE, EXTENSION_CONFIG)


@dataclass(frozen=True)
class DiscoverySettings:
    trust_domain: str = DEFAULTS.trust_domain
    default_inbound_mtls: Literal["PERMISSIVE", "STRICT"] = DEFAULTS.inbound_mtls
    plaintext_ports: tuple[int, ...] = DEFAULTS.plaintext_ports
    ports: Ports = field(default_factory=Ports)
    #: Debounce of config (non-endpoint) changes.
    quiet: float = 0.1
    max_delay: float = 10.0
    #: Scope each sidecar to its namespace, declared and learned dependencies.
    scoped: bool = False
    #: The agent's work directory in every sidecar (its SDS files are named from there).
    work_dir: str = names.WORK_DIR
    #: Metrics, access logs and traces compiled into every sidecar.
    telemetry: TelemetryConfig = DEFAULTS.telemetry
    #: The rate-limit service (``host:port``, gRPC) every sidecar asks about Global limits;
    #: empty: none (Global limits are reported, not enforced).
    ratelimit_address: str = ""
    #: The SPIFFE id sidecars require of the rate-limit service (default: its service account).
    ratelimit_identity: str = ""


class Discovery:
    """Everything the xDS server knows; call :meth:`start` on the loop that serves streams."""

    def __init__(self, store: ObjectStore, settings: DiscoverySettings) -> None:
        self.store = store
        self.settings = settings
        self.model = build_model({}, trust_domain=settings.trust_domain)
        #: Traffic rules resolved against the model (rebuilt with it).
        self.routing: RoutingTable = EMPTY
        self._logged_problems: frozenset[str] = frozenset()
        self.proxies: dict[int, ProxyConn] = {}
        self.authz = AuthzState(
            settings.trust_domain, ratelimit_service=bool(settings.ratelimit_address)
        )
        self.shared = SharedResources()
        #: The shared tables by type (CDS, EDS, RDS).
        self.tables = self.shared.tables
        self.views = ProxyViews(settings, self.shared, self.authz, self.model)
        self.generation = 0
        self._parse_cache = ParseCache()
        self._pending: set[Key] = set()
        self._slice_service: dict[Key, tuple[str, str]] = {}
        #: The reverse: a Service's EndpointSlices (an endpoint change reads only its own).
        self._service_slices: dict[tuple[str, str], set[Key]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._first_event: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._endpoint_flush = False
        self._model_changed = asyncio.Event()
        self._next_id = 0
        self._clock: Callable[[], float] = time.monotonic

    # --- changes ---------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.rebuild("start")
        self.store.subscribe(self._from_any_thread)

    def _from_any_thread(self, keys: frozenset[Key]) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.on_change, keys)

    def on_change(self, keys: Iterable[Key]) -> None:
        """A change seen by the store: push endpoints now, debounce everything else."""
        assert self._loop is not None
        keys = frozenset(keys)
        self._pending |= keys
        if all(k.kind == "EndpointSlice" for k in keys):
            if not self._endpoint_flush:
                self._endpoint_flush = True
                self._loop.call_soon(self._flush, "endpoints")
            return
        now = self._clock()
        if self._first_event is None:
            self._first_event = now
        else:
            metrics.DEBOUNCED.inc()
        if self._timer is not None:
            self._timer.cancel()
        due = min(now + self.settings.quiet, self._first_event + self.settings.max_delay)
        self._timer = self._loop.call_at(
            self._loop.time() + max(0.0, due - now), self._flush, "config"
        )

    def _flush(self, cause: str) -> None:
        if cause == "config":
            self._first_event, self._timer = None, None
        else:
            self._endpoint_flush = False
        keys, self._pending = self._pending, set()
        try:
            if cause == "endpoints" and self._timer is None and self._fast_endpoints(keys):
                return
            self.rebuild(cause)
        except Exception:  # a bug must not end the control plane; the old config stays
            LOG.exception("rebuilding the mesh config failed; proxies keep the last one")

    def _fast_endpoints(self, keys: Iterable[Key]) -> bool:
        """Only EndpointSlices changed: recompute just their Services' endpoints and push.
        False when that is not enough (a full rebuild follows)."""
        started = self._clock()
        services: set[tuple[str, str]] = set()
        for key in keys:
            if key.kind != "EndpointSlice":
                return False
            obj = self.store.get(key.kind, key.namespace, key.name)
            label = slice_service(obj) if obj is not None else None
            old = self._slice_service.get(key)
            if (obj is not None and label is None) or (old and label and old != label):
                return False
            svc = label or old
            if svc is None:
                return False
            services.add(svc)
            if obj is None:
                self._slice_service.pop(key, None)
                self._service_slices.get(svc, set()).discard(key)
            else:
                self._slice_service[key] = svc
                self._service_slices.setdefault(svc, set()).add(key)
        model = self.model
        for svc in services:
            slices = [
                o
                for k in sorted(self._service_slices.get(svc, ()))
                if (o := self.store.get(k.kind, k.namespace, k.name)) is not None
            ]
            updated = update_endpoints(model, svc, slices, self._parse_cache)
            if updated is None:
                return False
            model = updated
        self.model = model
        self.views.on_endpoints(model)
        self.generation += 1
        metrics.FLUSHES.labels("endpoints").inc()
        changed = [model.services[s] for s in services if s in model.services]
        self.shared.update(model, self.routing, self._template_options(), only=changed)
        for conn in list(self.proxies.values()):
            self._push_shared(conn)
        metrics.REBUILD.labels("endpoints").observe(self._clock() - started)
        return True

    def rebuild(self, cause: str) -> None:
        started = self._clock()
        metrics.FLUSHES.labels(cause).inc()
        objects = {kind: self.store.list(kind) for kind in KINDS}
        self.model = build_model(
            objects,
            trust_domain=self.settings.trust_domain,
            default_inbound_mtls=self.settings.default_inbound_mtls,
            cache=self._parse_cache,
        )
        self.authz.update(objects.get(ACCESS_POLICY, ()), objects.get(RATE_LIMIT_POLICY, ()))
        self.authz.check_references(self.model)
        self.routing = build_table(objects, self.model, self._parse_cache)
        self.views.on_model(self.model, self.routing)
        self._log_problems()
        self.generation += 1
        self._slice_service = {
            key_of(o, "EndpointSlice"): label
            for o in objects["EndpointSlice"]
            if (label := slice_service(o)) is not None
        }
        self._service_slices = {}
        for key, label in self._slice_service.items():
            self._service_slices.setdefault(label, set()).add(key)
        self.shared.update(self.model, self.routing, self._template_options())
        for conn in list(self.proxies.values()):
            self.push(conn)
        self._model_changed.set()
        self._model_changed = asyncio.Event()
        metrics.REBUILD.labels(cause).observe(self._clock() - started)
        self.shared.compact(self.proxies.values())

    def _log_problems(self) -> None:
        """Log each problem of the traffic rules once, when it appears (not every rebuild)."""
        now = frozenset(str(p) for p in self.routing.problems)
        for text in sorted(now - self._logged_problems):
            LOG.warning("traffic rule: %s", text)
        self._logged_problems = now

    def _template_options(self) -> BootstrapOptions:
        """Options for resources shared by every proxy (nothing pod-specific in them)."""
        pod = PodInfo("default", "shared", (), "default", True, "PERMISSIVE")
        return proxy_options(self.settings, pod)

    # --- proxies ---------------------------------------------------------------------------

    async def rebuilt(self) -> None:
        """Return after the next full rebuild of the model (and the traffic rules)."""
        await self._model_changed.wait()

    async def wait_for_pod(self, namespace: str, name: str, timeout: float) -> PodInfo | None:
        deadline = self._clock() + timeout
        while True:
            pod = self.model.pods.get((namespace, name))
            if pod is not None or self._clock() >= deadline:
                return pod
            waiter = self._model_changed
            try:
                await asyncio.wait_for(waiter.wait(), max(0.01, deadline - self._clock()))
            except TimeoutError:
                continue

    def connect(
        self, spiffe_id: str, namespace: str, pod: str, peer: str, node_id: str
    ) -> ProxyConn:
        self._next_id += 1
        conn = ProxyConn(
            self._next_id, spiffe_id, namespace, pod, peer, node_id, time.time(), asyncio.Queue()
        )
        self.proxies[conn.conn_id] = conn
        metrics.CONNECTED.set(len(self.proxies))
        return conn

    def disconnect(self, conn: ProxyConn) -> None:
        self.proxies.pop(conn.conn_id, None)
        metrics.CONNECTED.set(len(self.proxies))

    def pod_of(self, conn: ProxyConn) -> PodInfo | None:
        return self.model.pods.get((conn.namespace, conn.pod_name))

    def push(
        self,
        conn: ProxyConn,
        only: str | None = None,
        candidates: Iterable[str] | None = None,
        full: bool = False,
    ) -> None:
        """Queue what changed for ``conn`` (all types in order, or ``only`` one)."""
        pod = self.pod_of(conn)
        if pod is None:
            return  # the pod is gone; its stream is closed by the handler
        old_scope = conn.scope
        conn.scope = self.views.scope(conn, pod)
        scope_delta = old_scope ^ conn.scope
        conn.local = self.views.local(conn, pod)
        for type_url in PUSH_ORDER:
            if only is not None and type_url != only:
                continue
            ts = conn.types.get(type_url)
            if ts is None or not ts.requested:
                continue
            self._push_type(conn, ts, type_url, scope_delta, candidates, full)

    def _push_shared(self, conn: ProxyConn) -> None:
        """Only shared clusters and endpoints changed (the endpoint fast path): when the
        proxy's scope stayed and it has no on-demand aliases (they copy a shared cluster), its
        own resources are what they were, so only CDS and EDS are looked at."""
        pod = self.pod_of(conn)
        if pod is None or conn.ondemand or self.views.scope(conn, pod) != conn.scope:
            self.push(conn)
            return
        for type_url in (cc.CLUSTER, cc.ENDPOINTS):
            ts = conn.types.get(type_url)
            if ts is not None and ts.requested:
                self._push_type(conn, ts, type_url, frozenset(), None, False, local_changed=False)

    def _push_type(
        self,
        conn: ProxyConn,
        ts: TypeState,
        type_url: str,
        scope_delta: frozenset[str],
        extra: Iterable[str] | None,
        full: bool,
        local_changed: bool = True,
    ) -> None:
        table = self.tables.get(type_url)
        updates, removed = type_delta(
            conn, ts, type_url, table, scope_delta, extra, full=full, local_changed=local_changed
        )
        if updates or removed:
            self._send(conn, ts, type_url, updates, removed)

    def _send(
        self,
        conn: ProxyConn,
        ts: TypeState,
        type_url: str,
        updates: Mapping[str, Encoded],
        removed: list[str],
    ) -> None:
        conn.nonce += 1
        nonce = str(conn.nonce)
        names = sorted(updates)
        wrapped = [updates[n].wrapped(n, type_url) for n in names]
        resp = delta_response(type_url, nonce, str(self.generation), wrapped, sorted(removed))
        size = len(resp)
        ts.record_sent(nonce, updates, removed, self._clock())
        metrics.by_type(metrics.PUSHES, type_url).inc()
        metrics.by_type(metrics.PUSH_BYTES, type_url).inc(size)
        conn.queue.put_nowait(resp)

    def on_request(self, conn: ProxyConn, req: discovery_pb2.DeltaDiscoveryRequest) -> None:
        """An ACK, a NACK, or a subscription change from the proxy."""
        ts = conn.state(req.type_url)
        if req.response_nonce:
            pending = ts.pending.pop(req.response_nonce, None)
            if req.HasField("error_detail"):
                ts.nacks += 1
                names = pending[0] if pending else ()
                ts.last_nack = NackRecord(
                    req.type_url, req.response_nonce, req.error_detail.message, names
                )
                metrics.NACKS.labels(_short(req.type_url)).inc()
                LOG.warning(
                    "%s/%s rejected %s: %s",
                    conn.namespace,
                    conn.pod_name,
                    _short(req.type_url),
                    req.error_detail.message,
                )
            elif pending is not None:
                ts.last_acked_nonce = req.response_nonce
                metrics.by_type(metrics.CONVERGENCE, req.type_url).observe(
                    self._clock() - pending[1]
                )
        first = not ts.requested
        subscribe = list(req.resource_names_subscribe)
        if req.type_url == cc.CLUSTER and not first:
            wanted = [n for n in subscribe if n.startswith(LEARN_PREFIX)]
            if wanted:
                ts.subscribe(subscribe, dict(req.initial_resource_versions))
                unknown = self.views.learn(conn, wanted)
                if unknown:  # answered as removed: Envoy closes at once instead of waiting
                    self._send(conn, ts, cc.CLUSTER, {}, unknown)
                self.push(conn, candidates=subscribe)  # every type: the scope grew
                return
        if first or subscribe or req.resource_names_unsubscribe:
            ts.subscribe(subscribe, dict(req.initial_resource_versions))
            ts.unsubscribe(req.resource_names_unsubscribe)
            self.push(conn, only=req.type_url, candidates=subscribe, full=first)


def _short(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]
