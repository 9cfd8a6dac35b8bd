"""What one proxy sees beyond the shared tables: its scope, its own clusters and listeners, and
the aliases of the clusters it learned on demand.

Replicas of a workload see the same, so scopes and listeners are cached by what they are built
from (namespace, dependencies, learned Services, inbound mode, …): a hundred replicas cost one
build. The caches live until the model changes in a way they read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from webhook.dataplane.bootstrap import BootstrapOptions
from webhook.discovery import compiler as cc, metrics
from webhook.discovery.clusters import local_clusters
from webhook.discovery.conn import ProxyConn
from webhook.discovery.learn import (
    LEARN_PREFIX,
    alias_cluster,
    parse_learn_name,
    passthrough_cluster,
)
from webhook.discovery.listeners import build_listeners, proxy_facts, scoped_meshed_pods
from webhook.discovery.model import MeshModel, PodInfo, Service, ServicePort
from webhook.discovery.resources import Encoded, decode, encode
from webhook.discovery.scope import services_in_scope
from webhook.discovery.shared import SharedResources
from webhook.policy.envoy import EXTENSION_CONFIG
from webhook.policy.state import AuthzState
from webhook.ratelimit.compiler import service_cluster, service_identity
from webhook.routing import xds as routing
from webhook.routing.table import EMPTY, RoutingTable

if TYPE_CHECKING:
    from webhook.discovery.core import DiscoverySettings

__all__ = ["ProxyViews", "proxy_options"]

LOG = logging.getLogger("sidemesh.discovery")
#: ``ProxyConn.ondemand``'s target for a learned address that is no Service port.
PASSTHROUGH = ""


def proxy_options(settings: DiscoverySettings, pod: PodInfo) -> BootstrapOptions:
    """The bootstrap options ``pod``'s sidecar runs with, as the control plane sees them."""
    return cc.proxy_options(
        pod,
        trust_domain=settings.trust_domain,
        plaintext_ports=settings.plaintext_ports,
        ports=settings.ports,
        work_dir=settings.work_dir,
    )


class ProxyViews:
    """Per-proxy resources over one model and its traffic rules (set by :meth:`on_model`)."""

    def __init__(
        self,
        settings: DiscoverySettings,
        shared: SharedResources,
        authz: AuthzState,
        model: MeshModel,
    ) -> None:
        self.settings = settings
        self.shared = shared
        self.authz = authz
        self.model = model
        self.rules: RoutingTable = EMPTY
        self._scope_cache: dict[Any, frozenset[str]] = {}
        self._alias_cache: dict[tuple[str, str], Encoded] = {}
        self._listener_inputs: Any = None
        self._listener_cache: dict[Any, dict[str, Encoded]] = {}

    def on_model(self, model: MeshModel, rules: RoutingTable) -> None:
        """A full rebuild: scopes are recomputed; listeners when what they read changed."""
        self.model, self.rules = model, rules
        self._scope_cache.clear()
        inputs = (
            {k: (s.cluster_ips, s.ports) for k, s in model.services.items()},
            model.meshed_pod_ports(),
            model.server_first,
        )
        if inputs != self._listener_inputs:
            self._listener_inputs = inputs
            self._listener_cache.clear()

    def on_endpoints(self, model: MeshModel) -> None:
        """Only endpoints changed: scopes stay. They follow Services, traffic rules, a pod's
        namespace and dependencies and what it learned, none of which an endpoint change
        touches (recomputing them sorted every Service on every endpoint change)."""
        self.model = model

    # --- scope -------------------------------------------------------------------------------

    def scope(self, conn: ProxyConn, pod: PodInfo) -> frozenset[str]:
        """The shared cluster names ``conn`` sees."""
        if not self.settings.scoped:
            return self.shared.all_clusters
        # Replicas of a workload share a scope: computed once per model, not once per push.
        key = (pod.namespace, pod.dependencies, frozenset(conn.learned))
        scope = self._scope_cache.get(key)
        if scope is None:
            services = services_in_scope(self.model, pod, conn.learned)
            services = routing.scope_services(self.rules, self.model, services)
            scope = frozenset(routing.cluster_names(self.rules, services))
            self._scope_cache[key] = scope
        return scope

    def _services(self, scope: frozenset[str]) -> list[Service]:
        if scope is self.shared.all_clusters:
            return list(self.model.services.values())
        return [
            s
            for s in self.model.services.values()
            if any(s.cluster_name(p) in scope for p in s.ports)
        ]

    def _outside(self, services: list[Service]) -> list[Service]:
        """The Services with a ClusterIP that are not in ``services`` (a scoped sidecar's)."""
        inside = {(s.namespace, s.name) for s in services}
        return [
            s
            for key, s in sorted(self.model.services.items())
            if s.cluster_ips and key not in inside
        ]

    # --- learning on demand ------------------------------------------------------------------

    def learn(self, conn: ProxyConn, names: Iterable[str]) -> list[str]:
        """Resolve on-demand cluster names to Service ports; widen the scope with what they
        name. An address that is no Service port gets a passthrough cluster. Returns the names
        that are no address at all."""
        unknown = []
        for name in names:
            if parse_learn_name(name) is None:
                unknown.append(name)
                continue
            found = self._service_at(name)
            if found is None:
                conn.ondemand[name] = PASSTHROUGH
                continue
            svc, port = found
            conn.learned.add((svc.namespace, svc.name))
            conn.ondemand[name] = svc.cluster_name(port)
            metrics.LEARNED.inc()
            LOG.info(
                "%s/%s learned %s.%s (first connection to %s)",
                conn.namespace, conn.pod_name, svc.name, svc.namespace, name[len(LEARN_PREFIX):],
            )  # fmt: skip
        return unknown

    def _service_at(self, name: str) -> tuple[Service, ServicePort] | None:
        address = parse_learn_name(name)
        if address is None:
            return None
        ip, port_number = address
        for svc in self.model.services.values():
            if ip in svc.cluster_ips:
                for port in svc.ports:
                    if port.port == port_number:
                        return svc, port
        return None

    def _aliases(self, conn: ProxyConn) -> dict[str, Encoded]:
        """The on-demand clusters this sidecar asked for, as aliases of the Service clusters."""
        table = self.shared.tables[cc.CLUSTER]
        out: dict[str, Encoded] = {}
        for alias, real in conn.ondemand.items():
            if real == PASSTHROUGH:
                out[alias] = self._passthrough(alias)
                continue
            enc = table.items.get(real)
            if enc is None:
                continue  # the Service is gone; the alias goes with it
            key = (alias, enc.version)
            cached = self._alias_cache.get(key)
            if cached is None:
                real_dict = decode(cc.CLUSTER, enc)
                cached = encode(cc.CLUSTER, alias_cluster(alias, real_dict))
                self._alias_cache[key] = cached
            out[alias] = cached
        return out

    def _passthrough(self, alias: str) -> Encoded:
        key = (alias, PASSTHROUGH)
        cached = self._alias_cache.get(key)
        if cached is None:
            cached = encode(cc.CLUSTER, passthrough_cluster(alias))
            self._alias_cache[key] = cached
        return cached

    # --- the proxy's own resources -----------------------------------------------------------

    def local(self, conn: ProxyConn, pod: PodInfo) -> dict[str, dict[str, Encoded]]:
        """``conn``'s own clusters, listeners and filter configs, by type."""
        opts = proxy_options(self.settings, pod)
        clusters = self._local_clusters(opts)
        if conn.ondemand:
            clusters = {**clusters, **self._aliases(conn)}
        return {
            cc.CLUSTER: clusters,
            cc.LISTENER: self._listeners(conn, pod, opts),
            EXTENSION_CONFIG: self.authz.resources(pod),
        }

    def _local_clusters(self, opts: BootstrapOptions) -> dict[str, Encoded]:
        key = ("local", opts.ipv6)
        clusters = self._listener_cache.get(key)
        if clusters is None:
            built = local_clusters(opts, self.settings.telemetry)
            if self.settings.ratelimit_address:
                rls = service_cluster(
                    self.settings.ratelimit_address,
                    opts,
                    self.settings.ratelimit_identity
                    or service_identity(self.settings.trust_domain),
                )
                built[rls["name"]] = rls
            clusters = {n: encode(cc.CLUSTER, c) for n, c in built.items()}
            self._listener_cache[key] = clusters
        return clusters

    def _listeners(
        self, conn: ProxyConn, pod: PodInfo, opts: BootstrapOptions
    ) -> dict[str, Encoded]:
        server_first = self.model.server_first.get((pod.namespace, pod.name), frozenset())
        own = pod.namespace if self.settings.scoped else ""
        # Not the workload: the listeners name it from the sidecar's environment.
        ns_settings = self.model.namespace_telemetry.get(pod.namespace)
        access_log = proxy_facts(pod, opts, self.settings.telemetry, ns_settings).access_log
        key = ("listeners", conn.scope, own, opts.ipv6, pod.inbound_mtls, server_first, access_log)
        listeners = self._listener_cache.get(key)
        if listeners is None:
            scoped = self.settings.scoped
            services = self._services(conn.scope)
            meshed = scoped_meshed_pods(self.model, pod, services) if scoped else None
            learn = self._outside(services) if scoped else []
            built = build_listeners(
                self.model, opts, pod, services, meshed, learn, telemetry=self.settings.telemetry
            )
            listeners = {n: encode(cc.LISTENER, v) for n, v in built.items()}
            self._listener_cache[key] = listeners
        return listeners
