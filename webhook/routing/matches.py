"""The matches of an HTTPRoute or GRPCRoute rule (pure): path, headers, query parameters and
method, each checked as it is read.

A GRPCRoute's method match becomes a path match (gRPC calls are ``POST /<service>/<method>``),
so both kinds compile the same way. A match that cannot be used is a problem of the route and
is left out of its rule.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from webhook.routing.api import Reader, as_map

__all__ = [
    "HEADER_NAME",
    "Match",
    "PathMatch",
    "ValueMatch",
    "grpc_match",
    "http_match",
]

_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
#: An HTTP header name (RFC 9110 token).
HEADER_NAME: Final = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")


@dataclass(frozen=True)
class PathMatch:
    type: str  # Exact | PathPrefix | RegularExpression
    value: str


@dataclass(frozen=True)
class ValueMatch:
    """A header or query parameter match."""

    name: str
    type: str  # Exact | RegularExpression
    value: str


@dataclass(frozen=True)
class Match:
    path: PathMatch
    headers: tuple[ValueMatch, ...] = ()
    query: tuple[ValueMatch, ...] = ()
    method: str | None = None
    field: str = ""


def _regex_ok(r: Reader, where: str, value: str) -> bool:
    # Envoy uses RE2; Python's re accepts a superset of its syntax, so this catches typos,
    # not every construct RE2 refuses (backreferences and lookarounds are checked below).
    try:
        re.compile(value)
    except re.error as exc:
        r.bad(where, f"not a regular expression: {exc}")
        return False
    if re.search(r"\(\?[=!<]|\\[1-9]", value):
        r.bad(where, "lookarounds and backreferences are not RE2 (Envoy's regex engine)")
        return False
    return True


def _values(
    r: Reader, raw: Mapping[str, Any], key: str, where: str
) -> tuple[ValueMatch, ...] | None:
    out = []
    for w, item in r.items(raw, key, where):
        name, mtype, value = item.get("name"), item.get("type", "Exact"), item.get("value")
        if not isinstance(name, str) or (key == "headers" and not HEADER_NAME.match(name)):
            r.bad(
                f"{w}.name",
                f"{name!r} is not a valid {key[:-1] if key == 'headers' else 'parameter'} name",
            )
            return None
        if not isinstance(value, str):
            r.bad(f"{w}.value", "must be a string")
            return None
        if mtype not in ("Exact", "RegularExpression"):
            r.bad(f"{w}.type", f"{mtype!r}: want Exact or RegularExpression")
            return None
        if mtype == "RegularExpression" and not _regex_ok(r, f"{w}.value", value):
            return None
        out.append(ValueMatch(name.lower() if key == "headers" else name, mtype, value))
    return tuple(out)


def http_match(r: Reader, where: str, raw: Mapping[str, Any]) -> Match | None:
    path_raw = as_map(raw.get("path"))
    ptype, pvalue = path_raw.get("type", "PathPrefix"), path_raw.get("value", "/")
    if ptype not in ("Exact", "PathPrefix", "RegularExpression"):
        r.bad(f"{where}.path.type", f"{ptype!r}: want Exact, PathPrefix or RegularExpression")
        return None
    if not isinstance(pvalue, str) or (ptype != "RegularExpression" and not pvalue.startswith("/")):
        r.bad(f"{where}.path.value", f"{pvalue!r} must be a path starting with /")
        return None
    if ptype == "RegularExpression" and not _regex_ok(r, f"{where}.path.value", pvalue):
        return None
    headers = _values(r, raw, "headers", where)
    query = _values(r, raw, "queryParams", where)
    method = raw.get("method")
    if method is not None and method not in _METHODS:
        r.bad(f"{where}.method", f"{method!r} is not an HTTP method")
        return None
    if headers is None or query is None:
        return None
    return Match(PathMatch(ptype, pvalue), headers, query, method, where)


def grpc_match(r: Reader, where: str, raw: Mapping[str, Any]) -> Match | None:
    m = as_map(raw.get("method"))
    mtype, service, method = m.get("type", "Exact"), m.get("service"), m.get("method")
    if mtype not in ("Exact", "RegularExpression"):
        r.bad(f"{where}.method.type", f"{mtype!r}: want Exact or RegularExpression")
        return None
    headers = _values(r, raw, "headers", where)
    if headers is None:
        return None
    if mtype == "Exact":
        for part, value in (("service", service), ("method", method)):
            if value is not None and (not isinstance(value, str) or "/" in value or not value):
                r.bad(f"{where}.method.{part}", f"{value!r} is not a gRPC {part} name")
                return None
        if service and method:
            path = PathMatch("Exact", f"/{service}/{method}")
        elif service:
            path = PathMatch("PathPrefix", f"/{service}/")
        elif method:
            path = PathMatch("RegularExpression", f"/[^/]+/{re.escape(method)}")
        else:
            path = PathMatch("PathPrefix", "/")
    else:
        svc_re, method_re = service or "[^/]+", method or "[^/]+"
        for part, value in (("service", svc_re), ("method", method_re)):
            if not _regex_ok(r, f"{where}.method.{part}", str(value)):
                return None
        path = PathMatch("RegularExpression", f"/{svc_re}/{method_re}")
    return Match(path, headers, (), None, where)
