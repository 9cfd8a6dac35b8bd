"""Access policies as the compiler needs them: parsed, validated, frozen.

Pure. :func:`parse_policy` reads one ``AccessPolicy`` object (``sidemesh.io/v1alpha1``) and
either returns an :class:`AccessPolicy` or raises :class:`PolicyError` naming the field and the
value; :func:`parse_policies` keeps the good ones and reports the bad ones, so one bad object
never stops the others from being enforced.

The resource (see the policy docs for the task-oriented version)::

    apiVersion: sidemesh.io/v1alpha1
    kind: AccessPolicy
    metadata: {name: allow-frontend, namespace: shop}
    spec:
      selector: {matchLabels: {app: backend}}   # absent: every workload of the namespace;
                                                # in the root namespace: the whole mesh
      action: ALLOW                              # ALLOW | DENY | AUDIT
      rules:                                     # absent or []: matches nothing
      - from:                                    # any one of these (absent: any caller)
        - principal: spiffe://cluster.local/ns/shop/sa/frontend   # trailing * = prefix
        - serviceAccount: shop/frontend          # or "frontend" (the policy's namespace)
        - namespace: shop
        - authenticated: true                    # any verified mTLS peer
        - unauthenticated: true                  # plaintext (PERMISSIVE ports only)
        to:                                      # all of these (absent: anything)
          ports: [8080]                          # the pod's port (what the sidecar sees)
          paths: [/api/*, /healthz]              # exact, "prefix*" or "*suffix" (HTTP only)
          methods: [GET, POST]                   # HTTP only
          headers: {x-env: prod}                 # exact value, "*": present (HTTP only)

Decision order for one request at one workload (the same as Istio's):

====  ========================================================================================
1     a DENY policy matches                       → denied (403 / connection closed)
2     AUDIT policies that match are counted and logged; they never change the decision
3     no ALLOW policy selects the workload        → allowed
4     an ALLOW policy matches                     → allowed
5     otherwise                                   → denied (an ALLOW policy without rules is
                                                    therefore a default deny)
====  ========================================================================================
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from webhook import names

__all__ = [
    "ACTIONS",
    "API_VERSION",
    "KIND",
    "ROOT_NAMESPACE",
    "AccessPolicy",
    "Operation",
    "PolicyError",
    "Rule",
    "Source",
    "SourceKind",
    "parse_policies",
    "parse_policy",
]

API_VERSION: Final = "sidemesh.io/v1alpha1"
KIND: Final = "AccessPolicy"
ACTIONS: Final = ("ALLOW", "DENY", "AUDIT")
Action = Literal["ALLOW", "DENY", "AUDIT"]
SourceKind = Literal["principal", "serviceAccount", "namespace", "authenticated", "unauthenticated"]
_SOURCE_KINDS: Final = (
    "principal",
    "serviceAccount",
    "namespace",
    "authenticated",
    "unauthenticated",
)
_METHOD = re.compile(r"^[A-Z]+$")
_HEADER = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class PolicyError(ValueError):
    """An AccessPolicy that cannot be enforced: the message names the object and the field."""


@dataclass(frozen=True)
class Source:
    """Who calls. ``value`` is a SPIFFE id (``principal``, a trailing ``*`` is a prefix),
    ``namespace/name`` (``serviceAccount``), a namespace, or empty."""

    kind: SourceKind
    value: str = ""


@dataclass(frozen=True)
class Operation:
    """What is called; every non-empty field must match (each is a list of alternatives)."""

    ports: tuple[int, ...] = ()
    paths: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def http_only(self) -> bool:
        """Whether this needs an HTTP request to be decided (a TCP connection has none)."""
        return bool(self.paths or self.methods or self.headers)


@dataclass(frozen=True)
class Rule:
    #: Any of these (empty: any caller, with or without a certificate).
    sources: tuple[Source, ...] = ()
    to: Operation = Operation()


@dataclass(frozen=True)
class AccessPolicy:
    namespace: str
    name: str
    action: Action
    rules: tuple[Rule, ...]
    #: ``matchLabels``; None selects every workload of the namespace (or the mesh).
    selector: Mapping[str, str] | None = None

    @property
    def id(self) -> str:
        """The policy's name in Envoy's RBAC config, stats and denial bodies."""
        return f"{self.namespace}/{self.name}"

    def selects(self, namespace: str, labels: Mapping[str, str], root_namespace: str) -> bool:
        if self.namespace not in (namespace, root_namespace):
            return False
        if self.selector is None:
            return True
        return all(labels.get(k) == v for k, v in self.selector.items())


def parse_policies(
    objects: Iterable[Mapping[str, Any]],
) -> tuple[tuple[AccessPolicy, ...], dict[str, str]]:
    """The policies that parse, sorted by id, and ``{id: error}`` for the others."""
    good: list[AccessPolicy] = []
    bad: dict[str, str] = {}
    for obj in objects:
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), Mapping) else {}
        assert isinstance(meta, Mapping)
        where = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
        try:
            good.append(parse_policy(obj))
        except PolicyError as exc:
            bad[where] = str(exc)
    good.sort(key=lambda p: p.id)
    return tuple(good), bad


def parse_policy(obj: Mapping[str, Any]) -> AccessPolicy:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping) or not meta.get("name") or not meta.get("namespace"):
        raise PolicyError("AccessPolicy: metadata.name and metadata.namespace are required")
    namespace, name = str(meta["namespace"]), str(meta["name"])
    where = f"AccessPolicy {namespace}/{name}"
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        raise PolicyError(f"{where}: spec must be a map, got {spec!r}")
    action = spec.get("action", "ALLOW")
    if action not in ACTIONS:
        raise PolicyError(f"{where}: spec.action must be one of {', '.join(ACTIONS)}: {action!r}")
    raw_rules = spec.get("rules") or []
    if not isinstance(raw_rules, list):
        raise PolicyError(f"{where}: spec.rules must be a list, got {raw_rules!r}")
    rules = tuple(_rule(r, f"{where}: spec.rules[{i}]", namespace) for i, r in enumerate(raw_rules))
    return AccessPolicy(namespace, name, action, rules, _selector(spec.get("selector"), where))


def _selector(raw: Any, where: str) -> Mapping[str, str] | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or set(raw) - {"matchLabels"}:
        raise PolicyError(f"{where}: spec.selector supports matchLabels only, got {raw!r}")
    labels = raw.get("matchLabels") or {}
    if not isinstance(labels, Mapping):
        raise PolicyError(f"{where}: spec.selector.matchLabels must be a map, got {labels!r}")
    return {str(k): str(v) for k, v in labels.items()}


def _rule(raw: Any, where: str, own_namespace: str) -> Rule:
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where} must be a map, got {raw!r}")
    unknown = set(raw) - {"from", "to"}
    if unknown:
        raise PolicyError(f"{where}: unknown field(s) {sorted(unknown)} (from, to)")
    sources_raw = raw.get("from") or []
    if not isinstance(sources_raw, list):
        raise PolicyError(f"{where}.from must be a list, got {sources_raw!r}")
    sources = tuple(
        _source(s, f"{where}.from[{i}]", own_namespace) for i, s in enumerate(sources_raw)
    )
    return Rule(sources, _operation(raw.get("to"), f"{where}.to"))


def _source(raw: Any, where: str, own_namespace: str) -> Source:
    if not isinstance(raw, Mapping) or len(raw) != 1:
        raise PolicyError(f"{where} must have exactly one of {', '.join(_SOURCE_KINDS)}: {raw!r}")
    ((kind, value),) = raw.items()
    if kind in ("authenticated", "unauthenticated"):
        if value is not True:
            raise PolicyError(f"{where}.{kind} must be true, got {value!r}")
        return Source(kind)
    if kind not in _SOURCE_KINDS or not isinstance(value, str) or not value:
        raise PolicyError(
            f"{where}: {kind}: {value!r} is not a source ({', '.join(_SOURCE_KINDS)})"
        )
    if kind == "principal":
        scheme, _, rest = value.partition("://")
        if scheme != "spiffe" or not rest or "*" in value[:-1]:
            raise PolicyError(
                f"{where}.principal must be a spiffe:// id (a trailing * for a prefix): {value!r}"
            )
        return Source("principal", value)
    if kind == "serviceAccount":
        ns, _, sa = value.rpartition("/")
        ns = ns or own_namespace
        if not (_DNS_LABEL.match(ns) and re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", sa)):
            raise PolicyError(f"{where}.serviceAccount must be NAMESPACE/NAME or NAME: {value!r}")
        return Source("serviceAccount", f"{ns}/{sa}")
    if kind == "namespace" and not _DNS_LABEL.match(value):
        raise PolicyError(f"{where}.namespace is not a namespace name: {value!r}")
    return Source("namespace", value)


def _operation(raw: Any, where: str) -> Operation:
    if raw is None:
        return Operation()
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where} must be a map, got {raw!r}")
    unknown = set(raw) - {"ports", "paths", "methods", "headers"}
    if unknown:
        raise PolicyError(
            f"{where}: unknown field(s) {sorted(unknown)} (ports, paths, methods, headers)"
        )
    ports = _list(raw, "ports", where)
    for p in ports:
        if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 65535:
            raise PolicyError(f"{where}.ports: {p!r} is not a port (1-65535)")
    paths = _list(raw, "paths", where)
    for path in paths:
        if not isinstance(path, str) or not path or "*" in path.strip("*") or path == "**":
            raise PolicyError(f"{where}.paths: {path!r} (exact, prefix* or *suffix)")
    methods = _list(raw, "methods", where)
    for m in methods:
        if not isinstance(m, str) or not _METHOD.match(m):
            raise PolicyError(f"{where}.methods: {m!r} is not an HTTP method (upper case)")
    headers_raw = raw.get("headers") or {}
    if not isinstance(headers_raw, Mapping):
        raise PolicyError(f"{where}.headers must be a map of name to value, got {headers_raw!r}")
    headers: list[tuple[str, str]] = []
    for key, value in sorted(headers_raw.items()):
        if not isinstance(key, str) or not _HEADER.match(key.lower()) or not isinstance(value, str):
            raise PolicyError(f"{where}.headers: {key!r}: {value!r} (a header name and a string)")
        headers.append((key.lower(), value))
    return Operation(tuple(sorted(set(ports))), tuple(paths), tuple(methods), tuple(headers))


def _list(raw: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = raw.get(key) or []
    if not isinstance(value, list):
        raise PolicyError(f"{where}.{key} must be a list, got {value!r}")
    return value


#: Where a policy without a selector applies to every workload of the mesh.
ROOT_NAMESPACE: Final = names.CONTROL_PLANE_NAMESPACE
