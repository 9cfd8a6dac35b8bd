"""Parsers for the small value types that config keys, pod annotations, the proxy's environment
and the ``init-traffic`` flags share.

Each parser takes the raw string and returns a plain value, or raises :class:`ValueError` with a
short reason; the caller wraps it into an error that names the key, annotation, variable or
flag and the value (``NAME='value': reason``). The injector reads a pod's annotations with these
parsers and writes the result into the init container's flags, which ``init-traffic`` reads with
the same parsers: what one side accepts, the other does too. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from typing import TypeVar

__all__ = [
    "ALL",
    "check_port",
    "parse_bool",
    "parse_cidr",
    "parse_cidr_list",
    "parse_port",
    "parse_port_list",
    "parse_quantity",
]

#: The wildcard accepted by include-lists ("capture everything").
ALL = "*"

_TRUE = {"true", "yes", "on", "1", "enabled"}
_FALSE = {"false", "no", "off", "0", "disabled"}


def parse_bool(raw: str) -> bool:
    """``"true"``/``"false"`` (and the usual spellings: yes/no, on/off, 1/0, enabled/disabled)."""
    low = raw.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError("expected true or false")


def check_port(port: int) -> int:
    """A port number that is already an int (a flag, a config value): 1-65535."""
    if isinstance(port, bool) or not isinstance(port, int):
        raise ValueError(f"{port!r} is not a port number")
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is outside 1-65535")
    return port


def parse_port(raw: str) -> int:
    """A TCP port number, 1-65535."""
    text = raw.strip()
    # isdigit() alone accepts "²" and "８０"; a port is plain ASCII digits.
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{text!r} is not a port number")
    return check_port(int(text))


def _port_item(part: str) -> Iterable[int]:
    """One entry of a port list: a port, or a range ``lo-hi`` of at most 1024 ports."""
    if "-" not in part:
        return (parse_port(part),)
    lo_raw, _, hi_raw = part.partition("-")
    lo, hi = parse_port(lo_raw), parse_port(hi_raw)
    if hi < lo or hi - lo >= 1024:
        raise ValueError(f"bad port range {part!r}")
    return range(lo, hi + 1)


def parse_cidr(raw: str) -> str:
    """One IPv4/IPv6 CIDR, normalised (a bare address means /32 or /128).

    ``10.1.2.3/8`` is refused: host bits set is almost always a typo."""
    part = raw.strip()
    try:
        return str(ipaddress.ip_network(part, strict=True))
    except ValueError as exc:
        raise ValueError(f"{part!r} is not a CIDR ({exc})") from None


_T = TypeVar("_T", int, str)


def _parse_list(
    raw: str, allow_all: bool, what: str, item: Callable[[str], Iterable[_T]]
) -> tuple[_T, ...] | str:
    """A comma-separated list; ``"*"`` when ``allow_all``; '' is the empty list. Duplicates are
    removed and the order kept, so the output is stable for golden files."""
    text = raw.strip()
    if allow_all and text == ALL:
        return ALL
    if text == "":
        return ()
    out: dict[_T, None] = {}
    for entry in text.split(","):
        part = entry.strip()
        if not part:
            raise ValueError(f"empty entry in {what} list")
        out.update(dict.fromkeys(item(part)))
    return tuple(out)


def parse_port_list(raw: str, *, allow_all: bool = False) -> tuple[int, ...] | str:
    """A comma-separated list of ports (``"80, 443"``); ``"*"`` when ``allow_all``.

    Ranges (``"8000-8010"``) are accepted and expanded, at most 1024 ports per range.
    """
    return _parse_list(raw, allow_all, "port", _port_item)


def parse_cidr_list(raw: str, *, allow_all: bool = False) -> tuple[str, ...] | str:
    """A comma-separated list of CIDRs (:func:`parse_cidr`); ``"*"`` when ``allow_all``."""
    return _parse_list(raw, allow_all, "CIDR", lambda part: (parse_cidr(part),))


# Kubernetes resource.Quantity: a signed decimal number with an optional suffix, either a
# binary SI suffix (Ki Mi Gi Ti Pi Ei), a decimal SI suffix (n u m "" k M G T P E) or a
# decimal exponent (e3, E-2).
_QUANTITY = re.compile(
    r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
    r"(?:Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?\d+)?$",
    re.ASCII,  # \d must not match "１" (Kubernetes quantities are ASCII)
)


def parse_quantity(raw: str) -> str:
    """A Kubernetes quantity (``100m``, ``1.5``, ``128Mi``, ``1e3``); returned unchanged.

    Negative quantities are refused: no resource request or limit can be negative.
    """
    text = raw.strip()
    if not _QUANTITY.match(text):
        raise ValueError(f"{text!r} is not a Kubernetes quantity")
    if text.startswith("-"):
        raise ValueError("a resource quantity cannot be negative")
    return text
