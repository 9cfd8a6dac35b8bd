"""The Gateway API's ``RequestRedirect`` and ``URLRewrite`` filters: parsed, then turned into
Envoy's redirect action and rewrite fields (pure).

A prefix replacement follows the Gateway API by path element (``/old`` → ``/new`` turns
``/old/x`` into ``/new/x``, and ``/`` as the replacement turns it into ``/x``), which Envoy's
plain ``prefix_rewrite`` does not do at the edges (it would give ``/newx`` under a ``/`` match
and ``//x`` for ``/``), so both become a ``regex_rewrite`` anchored on the rule's prefix.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "PathChange",
    "Redirect",
    "Rewrite",
    "check_path_change",
    "parse_redirect",
    "parse_rewrite",
    "redirect_action",
    "rewrite_fields",
]

_CODES: Final = {
    301: "MOVED_PERMANENTLY",
    302: "FOUND",
    303: "SEE_OTHER",
    307: "TEMPORARY_REDIRECT",
    308: "PERMANENT_REDIRECT",
}
Bad = Callable[[str, str], None]


@dataclass(frozen=True)
class PathChange:
    type: str  # ReplaceFullPath | ReplacePrefixMatch
    value: str


@dataclass(frozen=True)
class Redirect:
    scheme: str | None = None
    hostname: str | None = None
    port: int | None = None
    path: PathChange | None = None
    status: int = 302


@dataclass(frozen=True)
class Rewrite:
    hostname: str | None = None
    path: PathChange | None = None


def _path(bad: Bad, where: str, raw: Any) -> tuple[bool, PathChange | None]:
    """(usable, the path change or None when there is none); a wrong one is reported."""
    if raw is None:
        return True, None
    if not isinstance(raw, Mapping):
        bad(where, "must be a map")
        return False, None
    kind = raw.get("type")
    key = {"ReplaceFullPath": "replaceFullPath", "ReplacePrefixMatch": "replacePrefixMatch"}
    if kind not in key:
        bad(f"{where}.type", f"{kind!r}: want ReplaceFullPath or ReplacePrefixMatch")
        return False, None
    value = raw.get(key[kind])
    if not isinstance(value, str) or not value.startswith("/"):
        bad(f"{where}.{key[kind]}", f"{value!r} must be a path starting with /")
        return False, None
    return True, PathChange(kind, value)


def _hostname(bad: Bad, where: str, raw: Any) -> tuple[bool, str | None]:
    if raw is None:
        return True, None
    if not isinstance(raw, str) or not re.match(r"^[a-z0-9*]([-a-z0-9.]*[a-z0-9])?$", raw):
        bad(where, f"{raw!r} is not a host name")
        return False, None
    return True, raw


def parse_redirect(bad: Bad, where: str, raw: Mapping[str, Any]) -> Redirect | None:
    path_ok, path = _path(bad, f"{where}.path", raw.get("path"))
    host_ok, host = _hostname(bad, f"{where}.hostname", raw.get("hostname"))
    scheme, port, status = raw.get("scheme"), raw.get("port"), raw.get("statusCode", 302)
    ok = path_ok and host_ok
    if scheme is not None and scheme not in ("http", "https"):
        bad(f"{where}.scheme", f"{scheme!r}: want http or https")
        ok = False
    if port is not None and (not isinstance(port, int) or not 1 <= port <= 65535):
        bad(f"{where}.port", f"{port!r} is not a port number")
        ok = False
    if status not in _CODES:
        bad(f"{where}.statusCode", f"{status!r}: want one of {', '.join(map(str, _CODES))}")
        ok = False
    if not ok:
        return None
    return Redirect(scheme, host, port, path, status)


def parse_rewrite(bad: Bad, where: str, raw: Mapping[str, Any]) -> Rewrite | None:
    path_ok, path = _path(bad, f"{where}.path", raw.get("path"))
    host_ok, host = _hostname(bad, f"{where}.hostname", raw.get("hostname"))
    if not (path_ok and host_ok):
        return None
    if path is None and host is None:
        bad(where, "set hostname, path or both")
        return None
    return Rewrite(host, path)


def _prefix_regex(prefix: str, replacement: str) -> dict[str, Any]:
    old = re.escape(prefix.rstrip("/"))
    new = replacement.rstrip("/")
    if not new:  # to the root: drop the prefix and the slashes after it
        return {"pattern": {"regex": f"^{old}/*(.*)$"}, "substitution": "/\\1"}
    return {"pattern": {"regex": f"^{old}(/.*)?$"}, "substitution": f"{new}\\1"}


def _path_fields(change: PathChange, prefix: str | None, full: str) -> dict[str, Any]:
    if change.type == "ReplaceFullPath":
        return {full: change.value}
    assert prefix is not None
    return {"regex_rewrite": _prefix_regex(prefix, change.value)}


def redirect_action(redirect: Redirect, prefix: str | None) -> dict[str, Any]:
    """Envoy's ``redirect`` for a rule; ``prefix``: its PathPrefix match (for a prefix change)."""
    out: dict[str, Any] = {"response_code": _CODES[redirect.status]}
    if redirect.scheme:
        out["scheme_redirect"] = redirect.scheme
    if redirect.hostname:
        out["host_redirect"] = redirect.hostname
    if redirect.port:
        out["port_redirect"] = redirect.port
    if redirect.path:
        out.update(_path_fields(redirect.path, prefix, "path_redirect"))
    return out


def rewrite_fields(rewrite: Rewrite, prefix: str | None) -> dict[str, Any]:
    """Fields of Envoy's route action that rewrite the request's Host and path."""
    out: dict[str, Any] = {}
    if rewrite.hostname:
        out["host_rewrite_literal"] = rewrite.hostname
    if rewrite.path:
        if rewrite.path.type == "ReplaceFullPath":
            out["regex_rewrite"] = {
                "pattern": {"regex": "^.*$"},
                "substitution": rewrite.path.value,
            }
        else:
            out.update(_path_fields(rewrite.path, prefix, ""))
    return out


def check_path_change(
    bad: Bad,
    where: str,
    match_types: list[str],
    redirect: Redirect | None,
    rewrite: Rewrite | None,
    has_backends: bool,
) -> tuple[Redirect | None, Rewrite | None]:
    """A rule's two filters as the Gateway API allows them (its CEL rules say the same);
    ``match_types``: the path match type of each of the rule's matches."""
    if redirect is not None and rewrite is not None:
        bad(f"{where}.filters", "RequestRedirect and URLRewrite together: the rewrite is ignored")
        rewrite = None
    if redirect is not None and has_backends:
        bad(f"{where}.backendRefs", "a RequestRedirect rule has no backends: they are ignored")
    one_prefix = match_types == ["PathPrefix"]
    for name in ("RequestRedirect", "URLRewrite"):
        change = redirect if name == "RequestRedirect" else rewrite
        path = change.path if change is not None else None
        if path is not None and path.type == "ReplacePrefixMatch" and not one_prefix:
            bad(f"{where}.matches", f"{name} with replacePrefixMatch needs exactly one "
                "PathPrefix match; the filter is ignored")  # fmt: skip
            if name == "RequestRedirect":
                redirect = None
            else:
                rewrite = None
    return redirect, rewrite
