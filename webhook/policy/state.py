"""The control plane's view of access policies: parsed once per rebuild, compiled per workload.

Each sidecar gets its four RBAC filter configs as ECDS resources (``TypedExtensionConfig``).
Workloads with the same namespace and labels get the same bytes, compiled and encoded once per
policy change; a sidecar whose configs did not change is sent nothing (the push engine sends
what differs from what the proxy has).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from webhook.discovery.model import PodInfo
from webhook.discovery.resources import Encoded, encode
from webhook.policy.compiler import WorkloadAuthz, compile_workload, policies_for
from webhook.policy.envoy import EXTENSION_CONFIG
from webhook.policy.model import ROOT_NAMESPACE, AccessPolicy, parse_policies

__all__ = ["AuthzState"]

LOG = logging.getLogger("sidemesh.policy")


class AuthzState:
    def __init__(self, trust_domain: str, root_namespace: str = ROOT_NAMESPACE) -> None:
        self.trust_domain = trust_domain
        self.root_namespace = root_namespace
        self.policies: tuple[AccessPolicy, ...] = ()
        #: Policies that did not parse: ``ns/name`` → why (shown by /debug and logged).
        self.errors: dict[str, str] = {}
        self._cache: dict[Any, tuple[WorkloadAuthz, dict[str, Encoded]]] = {}

    def update(self, objects: Iterable[Mapping[str, Any]]) -> bool:
        """Parse the AccessPolicy objects; True when the enforced set changed."""
        policies, errors = parse_policies(objects)
        for where, why in errors.items():
            if self.errors.get(where) != why:
                LOG.error("access policy %s not enforced: %s", where, why)
        self.errors = errors
        if policies == self.policies:
            return False
        self.policies = policies
        self._cache.clear()
        return True

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
            encoded = {
                name: encode(EXTENSION_CONFIG, {"name": name, "typed_config": dict(config)})
                for name, config in authz.filters.items()
            }
            hit = self._cache[key] = (authz, encoded)
        return hit
