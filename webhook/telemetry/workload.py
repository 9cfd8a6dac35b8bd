"""What a pod's *workload* is called in metrics and logs: the name of what owns its replicas.

A Deployment's pods are named ``<deployment>-<pod-template-hash>-<5 chars>`` and carry the
``pod-template-hash`` label; a StatefulSet's are ``<set>-<ordinal>`` with a
``statefulset.kubernetes.io/pod-name`` label. Both come back to the owner's name, so every
replica (and every restart) counts under one label value: the cardinality of a metric grows
with the number of workloads, not of pods. Without those labels the pod's
``app.kubernetes.io/name`` or ``app`` label names it, else the pod itself.

A sidecar learns its own workload, namespace and SPIFFE id at start, not from the control
plane: the injector hands the labels above to the proxy container by the downward API
(:data:`LABEL_ENV`), and the agent starts Envoy with :func:`proxy_environment`. The compiled
listeners read them with ``%ENVIRONMENT(…)%`` (:data:`OWN_WORKLOAD` …), which Envoy evaluates
once, when it builds the listener; so the listeners do not name the workload, and sidecars of
the same shape get byte-identical ones (the control plane builds and encodes them once).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

__all__ = [
    "ENV_NAMESPACE",
    "ENV_PRINCIPAL",
    "ENV_WORKLOAD",
    "LABEL_ENV",
    "OWN_NAMESPACE",
    "OWN_PRINCIPAL",
    "OWN_WORKLOAD",
    "UNKNOWN",
    "labels_from_env",
    "proxy_environment",
    "workload_name",
]

#: A label value for something a sidecar cannot know (a caller without identity, a pod IP).
UNKNOWN: Final = "unknown"
#: Envoy's environment: who this sidecar is (set by the agent, read by the listeners).
ENV_WORKLOAD: Final = "SIDEMESH_WORKLOAD"
ENV_NAMESPACE: Final = "SIDEMESH_NAMESPACE"
ENV_PRINCIPAL: Final = "SIDEMESH_PRINCIPAL"
#: Envoy's OpenTelemetry tracer names the sidecar's spans from this (its environment detector).
_ENV_OTEL_RESOURCE: Final = "OTEL_RESOURCE_ATTRIBUTES"
OWN_WORKLOAD: Final = f"%ENVIRONMENT({ENV_WORKLOAD})%"
OWN_NAMESPACE: Final = f"%ENVIRONMENT({ENV_NAMESPACE})%"
OWN_PRINCIPAL: Final = f"%ENVIRONMENT({ENV_PRINCIPAL})%"
#: The pod labels a workload's name comes from → the proxy container's variable holding each
#: (downward API ``metadata.labels['…']``; empty when the pod has no such label).
LABEL_ENV: Final = {
    "pod-template-hash": "SIDEMESH_LABEL_POD_TEMPLATE_HASH",
    "statefulset.kubernetes.io/pod-name": "SIDEMESH_LABEL_STATEFULSET_POD_NAME",
    "app.kubernetes.io/name": "SIDEMESH_LABEL_APP_NAME",
    "app": "SIDEMESH_LABEL_APP",
}
_STS_ORDINAL = re.compile(r"^(.+)-\d+$")
_DNS_LABEL_JUNK = re.compile(r"[^a-z0-9-]")


def workload_name(pod_name: str, labels: Mapping[str, str]) -> str:
    """The workload of a pod; always a DNS label (``.`` becomes ``-``), never empty."""
    name = _owner_name(pod_name, labels)
    cleaned = _DNS_LABEL_JUNK.sub("-", name.lower()).strip("-")
    return cleaned[:63] or UNKNOWN


def _owner_name(pod_name: str, labels: Mapping[str, str]) -> str:
    template_hash = labels.get("pod-template-hash")
    if template_hash:
        marker = f"-{template_hash}-"
        if marker in pod_name:
            return pod_name.rsplit(marker, 1)[0]
    if labels.get("statefulset.kubernetes.io/pod-name") == pod_name:
        match = _STS_ORDINAL.match(pod_name)
        if match:
            return match.group(1)
    for key in ("app.kubernetes.io/name", "app"):
        if labels.get(key):
            return labels[key]
    return pod_name


def labels_from_env(env: Mapping[str, str]) -> dict[str, str]:
    """The pod labels :func:`workload_name` reads, from the proxy container's environment."""
    return {label: env[var] for label, var in LABEL_ENV.items() if env.get(var)}


def proxy_environment(
    pod_name: str, namespace: str, principal: str, labels: Mapping[str, str]
) -> dict[str, str]:
    """The variables Envoy is started with so that its listeners can name it."""
    workload = workload_name(pod_name, labels)
    return {
        ENV_WORKLOAD: workload,
        ENV_NAMESPACE: namespace,
        ENV_PRINCIPAL: principal,
        _ENV_OTEL_RESOURCE: f"service.name={workload}.{namespace}",
    }
