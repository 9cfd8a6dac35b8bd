"""What the traffic rules share: the kinds, where a problem is, a reader that collects the
problems of one object as its fields are read, and duration values.

A :class:`Problem` names the object, the field (a JSON-path-like ``spec.rules[0].matches[1]``)
and what is wrong. Problems never stop the mesh from being programmed: a rule that cannot be
used is left out or answers an error status, and the problem is shown by ``sidemesh check``,
the control plane's log and ``/debug/rules``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

__all__ = [
    "GATEWAY_GROUP",
    "GRPC_ROUTE",
    "HTTP_ROUTE",
    "KINDS",
    "REFERENCE_GRANT",
    "SIDEMESH_GROUP",
    "SUBSET_KIND",
    "TRAFFIC_POLICY",
    "Problem",
    "Reader",
    "as_map",
    "envoy_duration",
    "parse_duration",
]

GATEWAY_GROUP: Final = "gateway.networking.k8s.io"
SIDEMESH_GROUP: Final = "sidemesh.io"
HTTP_ROUTE: Final = "HTTPRoute"
GRPC_ROUTE: Final = "GRPCRoute"
TRAFFIC_POLICY: Final = "TrafficPolicy"
#: A backendRef kind (group ``sidemesh.io``) naming ``<service>.<subset>``.
SUBSET_KIND: Final = "ServiceSubset"
#: The kinds the control plane watches for traffic rules.
#: Lets routes in other namespaces send to a namespace's Services (``v1beta1``: served by
#: every Gateway API release that has it).
REFERENCE_GRANT: Final = "ReferenceGrant"
KINDS: Final = (HTTP_ROUTE, GRPC_ROUTE, TRAFFIC_POLICY, REFERENCE_GRANT)

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """Something wrong with one object; ``field`` is where, in the object."""

    kind: str
    namespace: str
    name: str
    field: str
    message: str
    severity: Severity = "error"

    @property
    def object(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"

    def __str__(self) -> str:
        return f"{self.object}: {self.field}: {self.message}"


class Reader:
    """Collects problems about one object while its fields are read."""

    def __init__(self, kind: str, namespace: str, name: str) -> None:
        self.kind, self.namespace, self.name = kind, namespace, name
        self.problems: list[Problem] = []

    def bad(self, where: str, message: str, severity: Severity = "error") -> None:
        self.problems.append(
            Problem(self.kind, self.namespace, self.name, where, message, severity)
        )

    def items(self, obj: Mapping[str, Any], key: str, where: str) -> list[tuple[str, Any]]:
        value = obj.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.bad(f"{where}.{key}", "must be a list")
            return []
        out = []
        for i, item in enumerate(value):
            if isinstance(item, Mapping):
                out.append((f"{where}.{key}[{i}]", item))
            else:
                self.bad(f"{where}.{key}[{i}]", "must be a map")
        return out


def as_map(value: Any) -> Mapping[str, Any]:
    """``value`` when it is a map, else an empty one (a wrong type is reported where read)."""
    return value if isinstance(value, Mapping) else {}


# Gateway API's Duration: up to four <number><unit> parts, e.g. "1h30m", "250ms".
_DURATION: Final = re.compile(r"^(?:[0-9]{1,5}(?:h|ms|m|s)){1,4}$")
_PART: Final = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
_UNIT: Final = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(raw: object) -> float:
    """Seconds of a Gateway API duration (``"250ms"``, ``"1m30s"``); ValueError otherwise."""
    if not isinstance(raw, str) or not _DURATION.match(raw):
        raise ValueError(f"{raw!r} is not a duration like 250ms, 2s or 1m30s")
    return sum(int(n) * _UNIT[u] for n, u in _PART.findall(raw))


def envoy_duration(seconds: float) -> str:
    """A protobuf JSON Duration (``"0.250s"``), exact to the millisecond."""
    millis = round(seconds * 1000)
    return f"{millis // 1000}.{millis % 1000:03d}s" if millis % 1000 else f"{millis // 1000}s"
