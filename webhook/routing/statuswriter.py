"""Writes each traffic rule's (and access and rate-limit policy's) status to the API server
after every rebuild (the I/O edge of :mod:`webhook.routing.status` and
:mod:`webhook.policy.status`).

Runs on the push engine's loop: after each rebuild it computes, from the store's objects and
the routing table, the statuses that differ from what the objects carry, and sends them from a
worker thread (the client blocks), one JSON merge patch of the ``status`` subresource each. The
patch comes back as a watch event; the next rebuild then finds the status as wanted and writes
nothing. Two control-plane replicas compute the same statuses; the second write of one is a
no-op for the API server. A failed write is logged (once per object and error) and retried at
the next rebuild; it never stops the control plane.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from webhook.discovery.core import Discovery
from webhook.kube.client import KubeAPIError, KubeClient
from webhook.policy.model import AccessPolicy
from webhook.policy.status import POLICY_STATUS_KINDS, policy_status_update
from webhook.ratelimit.model import RateLimitPolicy
from webhook.routing.status import STATUS_KINDS, status_update

__all__ = ["StatusWriter"]

LOG = logging.getLogger("sidemesh.discovery")
_PLURAL = {"HTTPRoute": "httproutes", "GRPCRoute": "grpcroutes", "TrafficPolicy": "trafficpolicies",
           "AccessPolicy": "accesspolicies", "RateLimitPolicy": "ratelimitpolicies"}  # fmt: skip
_API = {
    "HTTPRoute": "gateway.networking.k8s.io/v1",
    "GRPCRoute": "gateway.networking.k8s.io/v1",
    "TrafficPolicy": "sidemesh.io/v1alpha1",
    "AccessPolicy": "sidemesh.io/v1alpha1",
    "RateLimitPolicy": "sidemesh.io/v1alpha1",
}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class StatusWriter:
    """``clock``: RFC 3339 time for ``lastTransitionTime`` (a seam for tests)."""

    def __init__(
        self, kube: KubeClient, discovery: Discovery, clock: Callable[[], str] = _now
    ) -> None:
        self._kube = kube
        self._d = discovery
        self._clock = clock
        self._failed: dict[tuple[str, str, str], str] = {}
        self.writes = 0

    def pending(self) -> list[tuple[str, str, str, dict[str, Any]]]:
        """``(kind, namespace, name, status)`` of every object whose status must change."""
        out = []
        now = self._clock()
        for kind in STATUS_KINDS:
            for obj in self._d.store.list(kind):
                status = status_update(obj, self._d.routing, now)
                if status is not None:
                    meta = obj.get("metadata") or {}
                    out.append((kind, str(meta.get("namespace")), str(meta.get("name")), status))
        # Access and rate-limit policies: Accepted, and references that resolve to nothing.
        authz = self._d.authz
        parsed: list[AccessPolicy | RateLimitPolicy] = [*authz.policies, *authz.limits]
        for kind in POLICY_STATUS_KINDS:
            for obj in self._d.store.list(kind):
                status = policy_status_update(
                    obj, parsed, authz.errors, self._d.model, authz.root_namespace, now
                )
                if status is not None:
                    meta = obj.get("metadata") or {}
                    out.append((kind, str(meta.get("namespace")), str(meta.get("name")), status))
        return out

    async def write_once(self) -> int:
        """Write what :meth:`pending` says; how many writes succeeded."""
        done = 0
        for kind, namespace, name, status in self.pending():
            key = (kind, namespace, name)
            try:
                await asyncio.to_thread(
                    self._kube.patch_status, _API[kind], _PLURAL[kind], namespace, name, status
                )
            except KubeAPIError as exc:
                if self._failed.get(key) != str(exc):
                    self._failed[key] = str(exc)
                    hint = (
                        " (the service account needs patch on its status)"
                        if exc.status == 403
                        else ""
                    )
                    LOG.warning(
                        "status of %s %s/%s not written: %s%s", kind, namespace, name, exc, hint
                    )
                continue
            self._failed.pop(key, None)
            done += 1
        self.writes += done
        return done

    async def run(self) -> None:
        """Write after every rebuild until cancelled."""
        while True:
            try:
                await self.write_once()
            except Exception:  # a bug here must not end the control plane
                LOG.exception("writing rule status failed")
            await self._d.rebuilt()
