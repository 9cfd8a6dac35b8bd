"""The control plane's view of access and rate-limit policies: parsed once per rebuild,
compiled per workload.

Each sidecar gets its four RBAC filter configs and its two rate-limit filter configs as ECDS
resources (``TypedExtensionConfig``).
Workloads with the same namespace and labels get the same bytes, compiled and encoded once per
policy change; a sidecar whose configs did not change is sent nothing (the push engine sends
what differs from what the proxy has).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from webhook.discovery.model import MeshModel, PodInfo
from webhook.discovery.resources import Encoded, encode
from webhook.policy.compiler import ECDS_NAMES, WorkloadAuthz, compile_workload, policies_for
from webhook.policy.envoy import EXTENSION_CONFIG
from webhook.policy.gate import GATE, GATE_TYPE, gate_values
from webhook.policy.model import ROOT_NAMESPACE, AccessPolicy, parse_policies
from webhook.policy.report import summary, unresolved
from webhook.ratelimit.compiler import compile_limits, limits_for
from webhook.ratelimit.model import RateLimitPolicy, parse_limit_policies

__all__ = ["AuthzState"]

LOG = logging.getLogger("sidemesh.policy")


class AuthzState:
    def __init__(
        self,
        trust_domain: str,
        root_namespace: str = ROOT_NAMESPACE,
        *,
        ratelimit_service: bool = False,
    ) -> None:
        self.trust_domain = trust_domain
        self.root_namespace = root_namespace
        #: Whether sidecars have the rate-limit service's cluster (Global limits need it).
        self.ratelimit_service = ratelimit_service
        self.policies: tuple[AccessPolicy, ...] = ()
        self.limits: tuple[RateLimitPolicy, ...] = ()
        #: Policies that did not parse: ``ns/name`` → why (shown by /debug and logged).
        self.errors: dict[str, str] = {}
        self._cache: dict[Any, tuple[WorkloadAuthz, dict[str, Encoded]]] = {}
        self._unresolved: set[str] = set()

    def update(
        self,
        objects: Iterable[Mapping[str, Any]],
        limit_objects: Iterable[Mapping[str, Any]] = (),
    ) -> bool:
        """Parse the AccessPolicy and RateLimitPolicy objects; True when what is enforced
        changed."""
        policies, errors = parse_policies(objects)
        limits, limit_errors = parse_limit_policies(limit_objects)
        errors = {**{f"AccessPolicy {k}": v for k, v in errors.items()},
                  **{f"RateLimitPolicy {k}": v for k, v in limit_errors.items()}}  # fmt: skip
        if not self.ratelimit_service:
            for p in limits:
                if any(limit.scope == "Global" for limit in p.limits):
                    errors[f"RateLimitPolicy {p.id}"] = (
                        f"RateLimitPolicy {p.id}: its Global limits are not enforced: the "
                        "control plane has no rate-limit service (--ratelimit-address)"
                    )
        for where, why in errors.items():
            if self.errors.get(where) != why:
                LOG.error("%s not enforced: %s", where, why)
        self.errors = errors
        if (policies, limits) == (self.policies, self.limits):
            return False
        self.policies, self.limits = policies, limits
        self._cache.clear()
        return True

    def check_references(self, model: MeshModel) -> None:
        """Log each policy reference that resolves to nothing, once (until it changes)."""
        every: list[AccessPolicy | RateLimitPolicy] = [*self.policies, *self.limits]
        found = {
            f"{type(p).__name__} {p.id}: {field}: {message}"
            for p in every
            for field, message in unresolved(p, model, self.root_namespace)
        }
        for line in sorted(found - self._unresolved):
            LOG.warning("%s", line)
        self._unresolved = found

    def report(self, model: MeshModel) -> dict[str, Any]:
        """The ``/debug/policies`` page."""
        return summary(self.policies, self.limits, self.errors, model, self.root_namespace)

    def workload(self, pod: PodInfo) -> WorkloadAuthz:
        return self._compiled(pod)[0]

    def resources(self, pod: PodInfo) -> dict[str, Encoded]:
        """ECDS name → encoded ``TypedExtensionConfig`` for ``pod``'s sidecar."""
        return self._compiled(pod)[1]

    def _compiled(self, pod: PodInfo) -> tuple[WorkloadAuthz, dict[str, Encoded]]:
        key = (pod.namespace, tuple(sorted(pod.labels.items())))
        hit = self._cache.get(key)
        if hit is None:
            selected = policies_for(self.policies, pod.namespace, pod.labels, self.root_namespace)
            authz = compile_workload(selected, self.trust_domain)
            limits = limits_for(self.limits, pod.namespace, pod.labels)
            deny, allow = (authz.filters[n] for n in ECDS_NAMES["tcp"])
            configs = {
                **authz.filters,
                GATE: {"@type": GATE_TYPE, "on_downstream_tls_handshake": gate_values(deny, allow)},
                **compile_limits(limits, service=self.ratelimit_service),
            }
            encoded = {
                name: encode(EXTENSION_CONFIG, {"name": name, "typed_config": dict(config)})
                for name, config in configs.items()
            }
            hit = self._cache[key] = (authz, encoded)
        return hit
