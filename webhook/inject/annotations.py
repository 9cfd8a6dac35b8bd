"""Per-pod overrides: the annotation names and their parsing into one frozen value.

Every ``sidemesh.io/`` and ``traffic.sidemesh.io/`` override annotation is read here, once, into
:class:`Overrides` (the mesh config's defaults filled in where the pod says nothing). A bad value
raises :class:`~webhook.errors.AnnotationError` naming the annotation and the value, so the pod is
refused with a message the user can act on; nothing is silently ignored except annotations that
sidemesh does not define. Pure: no I/O.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from webhook import names
from webhook.config import INBOUND_MTLS_MODES, LOG_LEVELS, MeshConfig
from webhook.errors import AnnotationError
from webhook.inject import memo
from webhook.values import ALL, parse_bool, parse_cidr_list, parse_port_list, parse_quantity

__all__ = [
    "ANNOTATIONS",
    "CNI",
    "EXCLUDE_INBOUND_PORTS",
    "EXCLUDE_OUTBOUND_CIDRS",
    "EXCLUDE_OUTBOUND_PORTS",
    "HOLD",
    "INBOUND_MTLS",
    "INCLUDE_INBOUND_PORTS",
    "INCLUDE_OUTBOUND_CIDRS",
    "LOG_LEVEL",
    "NATIVE_SIDECAR",
    "PROMETHEUS",
    "PROMETHEUS_PATH",
    "PROMETHEUS_PORT",
    "PROMETHEUS_SCRAPE",
    "PROXY_CPU",
    "PROXY_CPU_LIMIT",
    "PROXY_IMAGE",
    "PROXY_MEMORY",
    "PROXY_MEMORY_LIMIT",
    "REWRITE_PROBES",
    "UNKNOWN_MARK",
    "Overrides",
    "quantity_value",
    "read_overrides",
    "sidemesh_keys",
    "string_value",
]

NATIVE_SIDECAR: Final = "sidemesh.io/native-sidecar"
HOLD: Final = "sidemesh.io/hold-application-until-proxy-starts"
PROXY_IMAGE: Final = "sidemesh.io/proxy-image"
PROXY_CPU: Final = "sidemesh.io/proxy-cpu"
PROXY_MEMORY: Final = "sidemesh.io/proxy-memory"
PROXY_CPU_LIMIT: Final = "sidemesh.io/proxy-cpu-limit"
PROXY_MEMORY_LIMIT: Final = "sidemesh.io/proxy-memory-limit"
REWRITE_PROBES: Final = "sidemesh.io/rewrite-probes"
INBOUND_MTLS: Final = "sidemesh.io/inbound-mtls"
LOG_LEVEL: Final = "sidemesh.io/log-level"
INCLUDE_INBOUND_PORTS: Final = "traffic.sidemesh.io/include-inbound-ports"
EXCLUDE_INBOUND_PORTS: Final = "traffic.sidemesh.io/exclude-inbound-ports"
INCLUDE_OUTBOUND_CIDRS: Final = "traffic.sidemesh.io/include-outbound-cidrs"
EXCLUDE_OUTBOUND_CIDRS: Final = "traffic.sidemesh.io/exclude-outbound-cidrs"
EXCLUDE_OUTBOUND_PORTS: Final = "traffic.sidemesh.io/exclude-outbound-ports"
CNI: Final = "sidemesh.io/cni"

#: Every per-pod override annotation, in the order the docs list them.
ANNOTATIONS: Final = (
    NATIVE_SIDECAR,
    HOLD,
    PROXY_IMAGE,
    PROXY_CPU,
    PROXY_MEMORY,
    PROXY_CPU_LIMIT,
    PROXY_MEMORY_LIMIT,
    REWRITE_PROBES,
    INBOUND_MTLS,
    LOG_LEVEL,
    INCLUDE_INBOUND_PORTS,
    EXCLUDE_INBOUND_PORTS,
    INCLUDE_OUTBOUND_CIDRS,
    EXCLUDE_OUTBOUND_CIDRS,
    EXCLUDE_OUTBOUND_PORTS,
    CNI,
)

_ANNOTATION_SET: Final = frozenset(ANNOTATIONS)

# Prometheus scrape annotations; added only when the pod sets none of the three itself.
PROMETHEUS_SCRAPE: Final = "prometheus.io/scrape"
PROMETHEUS_PORT: Final = "prometheus.io/port"
PROMETHEUS_PATH: Final = "prometheus.io/path"
PROMETHEUS: Final = (PROMETHEUS_SCRAPE, PROMETHEUS_PORT, PROMETHEUS_PATH)

# An image reference: no whitespace, no shell metacharacters; the registry checks the rest.
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$")


@dataclass(frozen=True)
class Overrides:
    """What one pod asks for: the mesh config's defaults overridden by its annotations."""

    native_sidecar: bool
    hold: bool
    """Classic mode only: proxy first plus a postStart wait hook (native mode always holds)."""
    proxy_image: str
    cpu_request: str
    memory_request: str
    cpu_limit: str
    """Empty string: no limit."""
    memory_limit: str
    rewrite_probes: bool
    inbound_mtls: str
    log_level: str
    include_inbound_ports: tuple[int, ...] | str
    """``"*"`` or the ports (empty: capture no inbound traffic)."""
    exclude_inbound_ports: tuple[int, ...]
    """User exclusions only; the proxy's own never-captured ports are added by the injector."""
    include_outbound_cidrs: tuple[str, ...] | str
    exclude_outbound_cidrs: tuple[str, ...]
    exclude_outbound_ports: tuple[int, ...]
    read: tuple[str, ...]
    """The sidemesh annotations that were present (shown by ``sidemesh check``)."""
    cni: bool = False
    """CNI mode: the node's CNI plugin captures traffic; no NET_ADMIN init container."""


def string_value(name: str, raw: object, *, kind: str = "annotation") -> str:
    """Kubernetes label and annotation values are strings; an unquoted YAML ``true`` is not."""
    if isinstance(raw, str):
        return raw
    shown = "null" if raw is None else str(raw).lower() if isinstance(raw, bool) else str(raw)
    raise AnnotationError(
        name,
        shown,
        f'{kind} values must be strings (quote it in YAML: {name}: "{shown}")',
        kind=kind,
    )


def _parse(
    annotations: Mapping[str, Any], name: str, parser: Callable[[str], Any], default: Any
) -> Any:
    if name not in annotations:
        return default
    raw = string_value(name, annotations[name])
    try:
        return parser(raw)
    except ValueError as exc:
        raise AnnotationError(name, raw, str(exc)) from None


def _enum(choices: tuple[str, ...], *, upper: bool) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().upper() if upper else raw.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return parse


_mtls_mode = _enum(INBOUND_MTLS_MODES, upper=True)
_log_level = _enum(LOG_LEVELS, upper=False)


def _image(raw: str) -> str:
    text = raw.strip()
    if not _IMAGE.match(text):
        raise ValueError("not an image reference")
    return text


def _ports(raw: str) -> tuple[int, ...]:
    ports = parse_port_list(raw)
    assert not isinstance(ports, str)
    return ports


def _cidrs(raw: str) -> tuple[str, ...]:
    cidrs = parse_cidr_list(raw)
    assert not isinstance(cidrs, str)
    return cidrs


_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": "1e-9", "u": "1e-6", "m": "1e-3", "k": "1e3", "M": "1e6", "G": "1e9"}
_DECIMAL |= {"T": "1e12", "P": "1e15", "E": "1e18"}


@functools.lru_cache(maxsize=256)
def quantity_value(text: str) -> Decimal:
    """The numeric value of a Kubernetes quantity (already validated by ``parse_quantity``)."""
    for suffix, factor in _BINARY.items():
        if text.endswith(suffix):
            return Decimal(text[: -len(suffix)]) * factor
    if text and text[-1] in _DECIMAL and text[-2:-1].lower() != "e":
        return Decimal(text[:-1]) * Decimal(_DECIMAL[text[-1]])
    try:
        return Decimal(text)
    except InvalidOperation:  # pragma: no cover - parse_quantity accepted it
        raise ValueError(f"{text!r} is not a quantity") from None


def _check_request_within_limit(
    annotations: Mapping[str, Any], request: str, limit: str, req_name: str, lim_name: str
) -> None:
    if not limit or quantity_value(request) <= quantity_value(limit):
        return
    # Name the annotation the user set; when both are set, the request is the one to blame.
    name = req_name if req_name in annotations else lim_name
    value = request if name == req_name else limit
    raise AnnotationError(name, value, f"the proxy's request {request} exceeds its limit {limit}")


def read_overrides(annotations: Mapping[str, Any], config: MeshConfig) -> Overrides:
    """Parse every override annotation of a pod; raise AnnotationError on the first bad one."""
    if _ANNOTATION_SET.isdisjoint(annotations):
        return _defaults(config)  # most pods: the config's values, computed once per config
    return _read(annotations, config)


@memo.per_object(bound=16)
def _defaults(config: MeshConfig) -> Overrides:
    """The config's own values, as the overrides of a pod without sidemesh annotations."""
    return _read({}, config)


def _read(annotations: Mapping[str, Any], config: MeshConfig) -> Overrides:
    px = config.proxy
    ann = annotations
    ov = Overrides(
        native_sidecar=_parse(ann, NATIVE_SIDECAR, parse_bool, px.native_sidecar),
        hold=_parse(ann, HOLD, parse_bool, px.hold_application_until_proxy_starts),
        proxy_image=_parse(ann, PROXY_IMAGE, _image, px.image),
        cpu_request=_parse(ann, PROXY_CPU, parse_quantity, px.cpu_request),
        memory_request=_parse(ann, PROXY_MEMORY, parse_quantity, px.memory_request),
        cpu_limit=_parse(ann, PROXY_CPU_LIMIT, parse_quantity, px.cpu_limit),
        memory_limit=_parse(ann, PROXY_MEMORY_LIMIT, parse_quantity, px.memory_limit),
        rewrite_probes=_parse(ann, REWRITE_PROBES, parse_bool, config.rewrite_probes),
        inbound_mtls=_parse(ann, INBOUND_MTLS, _mtls_mode, config.inbound_mtls),
        log_level=_parse(ann, LOG_LEVEL, _log_level, px.log_level),
        include_inbound_ports=_parse(
            ann, INCLUDE_INBOUND_PORTS, lambda r: parse_port_list(r, allow_all=True), ALL
        ),
        exclude_inbound_ports=_parse(ann, EXCLUDE_INBOUND_PORTS, _ports, ()),
        include_outbound_cidrs=_parse(
            ann, INCLUDE_OUTBOUND_CIDRS, lambda r: parse_cidr_list(r, allow_all=True), ALL
        ),
        exclude_outbound_cidrs=_parse(ann, EXCLUDE_OUTBOUND_CIDRS, _cidrs, ()),
        exclude_outbound_ports=_parse(ann, EXCLUDE_OUTBOUND_PORTS, _ports, ()),
        read=tuple(name for name in ANNOTATIONS if name in ann),
        cni=_parse(ann, CNI, parse_bool, config.cni),
    )
    _check_request_within_limit(ann, ov.cpu_request, ov.cpu_limit, PROXY_CPU, PROXY_CPU_LIMIT)
    _check_request_within_limit(
        ann, ov.memory_request, ov.memory_limit, PROXY_MEMORY, PROXY_MEMORY_LIMIT
    )
    return ov


#: What sidemesh reads or writes under its prefixes; anything else there is probably a typo.
_KNOWN = frozenset(
    {*ANNOTATIONS, names.INJECT, names.STATUS, names.TRUST_BUNDLE_ANNOTATION, names.CNI_CAPTURE}
)
UNKNOWN_MARK: Final = " (unknown, ignored)"


def sidemesh_keys(labels: Mapping[str, Any], annotations: Mapping[str, Any]) -> list[str]:
    """Every sidemesh label/annotation on a pod, as ``label K`` / ``annotation K`` (for check).

    Annotations under sidemesh's prefixes that it does not define are marked with
    :data:`UNKNOWN_MARK`, so that ``sidemesh.io/proxy-cpus: "2"`` does not go unnoticed.
    """
    out = [f"label {k}" for k in labels if k == names.INJECT]
    out += [
        f"annotation {k}{'' if k in _KNOWN else UNKNOWN_MARK}"
        for k in annotations
        if k.startswith(("sidemesh.io/", "traffic.sidemesh.io/"))
    ]
    return out
