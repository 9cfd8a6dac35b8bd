"""Whether a pod gets the mesh: the decision order, first match wins.

| # | when                                               | inject  | reason                   |
|---|----------------------------------------------------|---------|--------------------------|
| 1 | ``spec.hostNetwork: true``                         | no      | ``host-network``         |
| 2 | annotation ``kubernetes.io/config.mirror`` present | no      | ``mirror-pod``           |
| 3 | namespace in ``config.ignored_namespaces``         | no      | ``ignored-namespace``    |
| 4 | label ``sidemesh.io/inject`` (else the annotation) | it says | ``opted-in``/``opted-out``|
| 5 | otherwise (the API server only sends opted-in pods)| yes     | ``namespace-policy``     |

Host networking comes first because capture rules would rewrite the *node's* iptables; mirror
pods are static pods the API server cannot change anyway. A skip is an answer, not an error.
``already-injected`` is the answer :func:`webhook.inject.pod.inject_pod` gives when a pod carries
an up-to-date injection (its status annotation) — that needs the rendered pod, not just policy.
A label or annotation value that is not a boolean raises AnnotationError. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from webhook import names
from webhook.config import MeshConfig
from webhook.errors import AnnotationError
from webhook.inject.annotations import string_value
from webhook.values import parse_bool

__all__ = [
    "ALREADY_INJECTED",
    "HOST_NETWORK",
    "IGNORED_NAMESPACE",
    "MIRROR_POD",
    "NAMESPACE_POLICY",
    "OPTED_IN",
    "OPTED_OUT",
    "REASONS",
    "Decision",
    "decide",
]

HOST_NETWORK: Final = "host-network"
MIRROR_POD: Final = "mirror-pod"
IGNORED_NAMESPACE: Final = "ignored-namespace"
OPTED_OUT: Final = "opted-out"
OPTED_IN: Final = "opted-in"
NAMESPACE_POLICY: Final = "namespace-policy"
ALREADY_INJECTED: Final = "already-injected"
#: Every reason a decision can carry (stable: metrics and scripts key on them).
REASONS: Final = (
    HOST_NETWORK,
    MIRROR_POD,
    IGNORED_NAMESPACE,
    OPTED_OUT,
    OPTED_IN,
    NAMESPACE_POLICY,
    ALREADY_INJECTED,
)


@dataclass(frozen=True)
class Decision:
    """Inject or not, and the stable reason why."""

    inject: bool
    reason: str


# One Decision per outcome of the table above, built once: it is frozen, so every pod can share
# it (building a frozen dataclass costs about as much as the rest of the decision).
# ``already-injected`` is decided by the injector, not here.
_DECISIONS: Final = {
    reason: Decision(reason in (OPTED_IN, NAMESPACE_POLICY), reason)
    for reason in REASONS
    if reason != ALREADY_INJECTED
}


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _opt(name: str, raw: object, kind: str) -> Decision:
    text = string_value(name, raw, kind=kind)
    try:
        wanted = parse_bool(text)
    except ValueError as exc:
        raise AnnotationError(name, text, str(exc), kind=kind) from None
    return _DECISIONS[OPTED_IN if wanted else OPTED_OUT]


def decide(pod: Mapping[str, Any], namespace: str, config: MeshConfig) -> Decision:
    """Apply the decision order to a pod (or a pod template) in ``namespace``."""
    spec = _mapping(pod.get("spec"))
    if spec.get("hostNetwork") is True:
        return _DECISIONS[HOST_NETWORK]
    meta = _mapping(pod.get("metadata"))
    annotations = _mapping(meta.get("annotations"))
    if names.MIRROR_POD in annotations:
        return _DECISIONS[MIRROR_POD]
    if namespace in config.ignored_namespaces:
        return _DECISIONS[IGNORED_NAMESPACE]
    labels = _mapping(meta.get("labels"))
    if names.INJECT in labels:
        return _opt(names.INJECT, labels[names.INJECT], "label")
    if names.INJECT in annotations:
        return _opt(names.INJECT, annotations[names.INJECT], "annotation")
    return _DECISIONS[NAMESPACE_POLICY]
