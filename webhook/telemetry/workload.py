"""What a pod's *workload* is called in metrics and logs: the name of what owns its replicas.

A Deployment's pods are named ``<deployment>-<pod-template-hash>-<5 chars>`` and carry the
``pod-template-hash`` label; a StatefulSet's are ``<set>-<ordinal>`` with a
``statefulset.kubernetes.io/pod-name`` label. Both come back to the owner's name, so every
replica (and every restart) counts under one label value: the cardinality of a metric grows
with the number of workloads, not of pods. Without those labels the pod's
``app.kubernetes.io/name`` or ``app`` label names it, else the pod itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

__all__ = ["UNKNOWN", "workload_name"]

#: A label value for something a sidecar cannot know (a caller without identity, a pod IP).
UNKNOWN: Final = "unknown"
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
