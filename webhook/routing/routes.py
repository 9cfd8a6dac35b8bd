"""HTTPRoute and GRPCRoute (``gateway.networking.k8s.io/v1``) as the mesh reads them (pure).

A route is a *mesh* route (the GAMMA profile) when a ``parentRef`` names a Service
(``group: ""``, ``kind: Service``); it then applies to requests that mesh clients send to that
Service, on the parent's ``port`` or on all its HTTP ports. ParentRefs to Gateways are not for
the mesh and are ignored. What is parsed here is kept close to the API; what cannot be used is
a :class:`~webhook.routing.api.Problem` naming the field, and the part it concerns is left out
(an unusable match) or answers an error (an unusable backend gets its share of 500s, as the
Gateway API asks).

The matches of a rule are read by :mod:`webhook.routing.matches`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from webhook.routing.api import (
    GATEWAY_GROUP,
    GRPC_ROUTE,
    HTTP_ROUTE,
    SIDEMESH_GROUP,
    SUBSET_KIND,
    Problem,
    Reader,
    as_map,
    parse_duration,
)
from webhook.routing.matches import HEADER_NAME, Match, PathMatch, grpc_match, http_match
from webhook.routing.rewrite import (
    Redirect,
    Rewrite,
    check_path_change,
    parse_redirect,
    parse_rewrite,
)

__all__ = [
    "Backend",
    "HeaderOps",
    "Mirror",
    "Parent",
    "Route",
    "Rule",
    "parse_route",
]


@dataclass(frozen=True)
class Backend:
    """A backendRef: a Service port, or a subset of one (``ServiceSubset`` ``svc.subset``)."""

    namespace: str
    service: str
    port: int | None
    weight: int
    subset: str | None = None
    field: str = ""
    #: Why it cannot be used (then requests for its share get a 500), or "".
    invalid: str = ""

    @property
    def label(self) -> str:
        sub = f" subset {self.subset}" if self.subset else ""
        return f"{self.namespace}/{self.service}:{self.port}{sub}"


@dataclass(frozen=True)
class HeaderOps:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True)
class Mirror:
    backend: Backend
    percent: float = 100.0


@dataclass(frozen=True)
class Rule:
    index: int
    matches: tuple[Match, ...]
    backends: tuple[Backend, ...]
    request_headers: HeaderOps | None = None
    response_headers: HeaderOps | None = None
    mirrors: tuple[Mirror, ...] = ()
    #: ``timeouts.request`` and ``timeouts.backendRequest`` in seconds (0: no timeout).
    timeout: float | None = None
    backend_timeout: float | None = None
    name: str = ""
    redirect: Redirect | None = None
    rewrite: Rewrite | None = None


@dataclass(frozen=True)
class Parent:
    namespace: str
    service: str
    port: int | None
    field: str


@dataclass(frozen=True)
class Route:
    kind: str
    namespace: str
    name: str
    #: ``metadata.creationTimestamp`` (RFC 3339; sorts as text): older routes win ties.
    created: str
    parents: tuple[Parent, ...]
    rules: tuple[Rule, ...]
    problems: tuple[Problem, ...] = field(default=(), compare=False)

    @property
    def ref(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


def parse_route(obj: Mapping[str, Any]) -> Route:
    """The route in ``obj`` (an HTTPRoute or GRPCRoute as the API server stores it)."""
    meta = as_map(obj.get("metadata"))
    kind = str(obj.get("kind") or HTTP_ROUTE)
    namespace, name = str(meta.get("namespace") or "default"), str(meta.get("name") or "")
    r = Reader(kind, namespace, name)
    spec = as_map(obj.get("spec"))
    parents = tuple(
        p for w, raw in r.items(spec, "parentRefs", "spec") if (p := _parent(r, w, raw, namespace))
    )
    rules = tuple(
        _rule(r, w, raw, i, namespace) for i, (w, raw) in enumerate(r.items(spec, "rules", "spec"))
    )
    if not rules:
        r.bad("spec.rules", "no rules: every request to the parent would get a 404", "warning")
    return Route(kind, namespace, name, str(meta.get("creationTimestamp") or ""), parents, rules,
                 tuple(r.problems))  # fmt: skip


def _parent(r: Reader, where: str, raw: Mapping[str, Any], namespace: str) -> Parent | None:
    group, kind = raw.get("group", GATEWAY_GROUP), raw.get("kind", "Gateway")
    if (group or "") != "" or kind != "Service":
        return None  # a Gateway (or another parent): not the mesh's business
    port = raw.get("port")
    if port is not None and not _is_port(port):
        r.bad(f"{where}.port", f"{port!r} is not a port number")
        return None
    return Parent(str(raw.get("namespace") or namespace), str(raw.get("name") or ""), port, where)


def _is_port(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def _rule(r: Reader, where: str, raw: Mapping[str, Any], index: int, ns: str) -> Rule:
    if r.kind == GRPC_ROUTE:
        matches = [x for w, m in r.items(raw, "matches", where) if (x := grpc_match(r, w, m))]
    else:
        matches = [x for w, m in r.items(raw, "matches", where) if (x := http_match(r, w, m))]
    if "matches" not in raw or raw.get("matches") == []:
        matches = [Match(PathMatch("PathPrefix", "/"), field=f"{where}.matches")]
    elif not matches:
        r.bad(f"{where}.matches", "no usable match: the rule is left out")
    backends = tuple(
        _backend(r, w, b, ns, default_weight=1) for w, b in r.items(raw, "backendRefs", where)
    )
    req = resp = None
    redirect: Redirect | None = None
    rewrite: Rewrite | None = None
    mirrors: list[Mirror] = []
    for w, f in r.items(raw, "filters", where):
        ftype = f.get("type")
        if ftype == "RequestHeaderModifier":
            req = _header_ops(
                r, f"{w}.requestHeaderModifier", as_map(f.get("requestHeaderModifier"))
            )
        elif ftype == "ResponseHeaderModifier":
            resp = _header_ops(
                r, f"{w}.responseHeaderModifier", as_map(f.get("responseHeaderModifier"))
            )
        elif ftype == "RequestMirror":
            mirror = _mirror(r, f"{w}.requestMirror", as_map(f.get("requestMirror")), ns)
            if mirror is not None:
                mirrors.append(mirror)
        elif ftype == "RequestRedirect" and r.kind == HTTP_ROUTE:
            redirect = parse_redirect(
                r.bad, f"{w}.requestRedirect", as_map(f.get("requestRedirect"))
            )
        elif ftype == "URLRewrite" and r.kind == HTTP_ROUTE:
            rewrite = parse_rewrite(r.bad, f"{w}.urlRewrite", as_map(f.get("urlRewrite")))
        else:
            r.bad(f"{w}.type", f"filter {ftype!r} is not supported by sidemesh yet; ignored")
    timeouts = as_map(raw.get("timeouts"))
    timeout = _seconds(r, f"{where}.timeouts.request", timeouts.get("request"))
    per_try = _seconds(r, f"{where}.timeouts.backendRequest", timeouts.get("backendRequest"))
    if timeout and per_try and per_try > timeout:
        r.bad(f"{where}.timeouts.backendRequest", "must not be longer than timeouts.request")
    redirect, rewrite = check_path_change(
        r.bad, where, [m.path.type for m in matches], redirect, rewrite, bool(backends)
    )
    return Rule(index, tuple(matches), backends, req, resp, tuple(mirrors), timeout, per_try,
                str(raw.get("name") or ""), redirect, rewrite)  # fmt: skip


def _seconds(r: Reader, where: str, raw: Any) -> float | None:
    if raw is None:
        return None
    try:
        return parse_duration(raw)
    except ValueError as exc:
        r.bad(where, str(exc))
        return None


def _backend(
    r: Reader, where: str, raw: Mapping[str, Any], ns: str, default_weight: int
) -> Backend:
    group, kind = raw.get("group") or "", raw.get("kind", "Service")
    name, port = str(raw.get("name") or ""), raw.get("port")
    namespace = str(raw.get("namespace") or ns)
    weight = raw.get("weight", default_weight)
    if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= 1_000_000:
        r.bad(f"{where}.weight", f"{weight!r} must be a whole number from 0 to 1000000")
        weight = 0
    if port is not None and not _is_port(port):
        r.bad(f"{where}.port", f"{port!r} is not a port number")
        port = None
    subset = None
    invalid = ""
    if group == SIDEMESH_GROUP and kind == SUBSET_KIND:
        name, dot, subset = name.partition(".")
        if not dot or not subset:
            invalid = f"a {SUBSET_KIND} is named <service>.<subset>, not {raw.get('name')!r}"
    elif group != "" or kind != "Service":
        invalid = (
            f"backend kind {kind!r} of group {group!r} is not supported "
            f"(Service, or {SUBSET_KIND} of {SIDEMESH_GROUP})"
        )
    if not invalid and port is None:
        invalid = "a Service backend needs a port"
    if invalid:
        r.bad(where, f"{invalid}; its share of requests gets 500")
    return Backend(namespace, name, port, weight, subset, where, invalid)


def _header_ops(r: Reader, where: str, raw: Mapping[str, Any]) -> HeaderOps:
    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        out = []
        for w, item in r.items(raw, key, where):
            name, value = item.get("name"), item.get("value")
            if (
                not isinstance(name, str)
                or not HEADER_NAME.match(name)
                or not isinstance(value, str)
            ):
                r.bad(w, "needs a header name and a string value")
                continue
            out.append((name.lower(), value))
        return tuple(out)

    remove = raw.get("remove") or []
    if not isinstance(remove, list) or not all(isinstance(x, str) for x in remove):
        r.bad(f"{where}.remove", "must be a list of header names")
        remove = []
    return HeaderOps(pairs("set"), pairs("add"), tuple(x.lower() for x in remove))


def _mirror(r: Reader, where: str, raw: Mapping[str, Any], ns: str) -> Mirror | None:
    ref = as_map(raw.get("backendRef"))
    if not ref:
        r.bad(f"{where}.backendRef", "is required")
        return None
    backend = _backend(r, f"{where}.backendRef", ref, ns, default_weight=1)
    if backend.invalid:
        return None
    percent = 100.0
    if "percent" in raw:
        percent = float(raw["percent"]) if isinstance(raw["percent"], int) else -1.0
    elif "fraction" in raw:
        frac = as_map(raw["fraction"])
        num, den = frac.get("numerator"), frac.get("denominator", 100)
        if isinstance(num, int) and isinstance(den, int) and den > 0:
            percent = 100.0 * num / den
        else:
            percent = -1.0
    if not 0.0 <= percent <= 100.0:
        r.bad(where, "percent (or fraction) must be between 0 and 100 %")
        return None
    return Mirror(backend, percent)
