"""Every per-pod override: parsed, defaulted from the config, refused with name and value."""

from __future__ import annotations

from typing import Any

import pytest

from webhook.config import MeshConfig, load_config
from webhook.errors import AnnotationError
from webhook.inject import annotations as a
from webhook.inject.annotations import quantity_value, read_overrides, sidemesh_keys

CFG = MeshConfig()


def test_defaults_come_from_the_config() -> None:
    ov = read_overrides({}, CFG)
    assert ov.native_sidecar is True and ov.hold is False and ov.rewrite_probes is True
    assert (ov.proxy_image, ov.cpu_request, ov.memory_limit) == (
        CFG.proxy.image,
        CFG.proxy.cpu_request,
        CFG.proxy.memory_limit,
    )
    assert (ov.inbound_mtls, ov.log_level) == ("PERMISSIVE", "warning")
    assert ov.include_inbound_ports == "*" and ov.include_outbound_cidrs == "*"
    assert ov.exclude_inbound_ports == () and ov.read == ()
    cfg = load_config({"inbound_mtls": "STRICT", "proxy": {"native_sidecar": False}})
    ov = read_overrides({}, cfg)
    assert ov.inbound_mtls == "STRICT" and ov.native_sidecar is False


@pytest.mark.parametrize(
    ("name", "raw", "field", "value"),
    [
        (a.NATIVE_SIDECAR, "false", "native_sidecar", False),
        (a.HOLD, "yes", "hold", True),
        (a.PROXY_IMAGE, "registry.example:5000/p/sm@sha256:abc", "proxy_image",
         "registry.example:5000/p/sm@sha256:abc"),
        (a.PROXY_CPU, "250m", "cpu_request", "250m"),
        (a.PROXY_MEMORY, "64Mi", "memory_request", "64Mi"),
        (a.PROXY_CPU_LIMIT, "1.5", "cpu_limit", "1.5"),
        (a.PROXY_MEMORY_LIMIT, "2Gi", "memory_limit", "2Gi"),
        (a.REWRITE_PROBES, "off", "rewrite_probes", False),
        (a.INBOUND_MTLS, "strict", "inbound_mtls", "STRICT"),
        (a.LOG_LEVEL, "DEBUG", "log_level", "debug"),
        (a.INCLUDE_INBOUND_PORTS, "80, 8080-8081", "include_inbound_ports", (80, 8080, 8081)),
        (a.INCLUDE_INBOUND_PORTS, "", "include_inbound_ports", ()),
        (a.EXCLUDE_INBOUND_PORTS, "9090", "exclude_inbound_ports", (9090,)),
        (a.INCLUDE_OUTBOUND_CIDRS, "10.0.0.0/8,fd00::/8", "include_outbound_cidrs",
         ("10.0.0.0/8", "fd00::/8")),
        (a.EXCLUDE_OUTBOUND_CIDRS, "169.254.169.254", "exclude_outbound_cidrs",
         ("169.254.169.254/32",)),
        (a.EXCLUDE_OUTBOUND_PORTS, "5432,5432", "exclude_outbound_ports", (5432,)),
    ],
)  # fmt: skip
def test_each_annotation_is_parsed(name: str, raw: str, field: str, value: Any) -> None:
    ov = read_overrides({name: raw}, CFG)
    assert getattr(ov, field) == value
    assert ov.read == (name,)


@pytest.mark.parametrize(
    ("name", "raw", "why"),
    [
        (a.NATIVE_SIDECAR, "sometimes", "expected true or false"),
        (a.PROXY_IMAGE, "", "not an image reference"),
        (a.PROXY_IMAGE, "img; rm -rf /", "not an image reference"),
        (a.PROXY_CPU, "-1", "cannot be negative"),
        (a.PROXY_MEMORY, "12 Mi", "not a Kubernetes quantity"),
        (a.INBOUND_MTLS, "DISABLE", "PERMISSIVE, STRICT"),
        (a.LOG_LEVEL, "loud", "expected one of"),
        (a.INCLUDE_INBOUND_PORTS, "0", "outside 1-65535"),
        (a.EXCLUDE_INBOUND_PORTS, "*", "not a port number"),
        (a.EXCLUDE_OUTBOUND_CIDRS, "*", "not a CIDR"),
        (a.INCLUDE_OUTBOUND_CIDRS, "10.0.0.0/33", "not a CIDR"),
        (a.EXCLUDE_OUTBOUND_PORTS, "1-5000", "bad port range"),
    ],
)
def test_bad_values_name_the_annotation_and_the_value(name: str, raw: str, why: str) -> None:
    with pytest.raises(AnnotationError) as info:
        read_overrides({name: raw}, CFG)
    assert info.value.name == name and info.value.value == raw
    assert f"annotation {name}={raw!r}" in str(info.value) and why in str(info.value)


def test_non_string_values_are_refused_with_a_hint_to_quote_them() -> None:
    with pytest.raises(AnnotationError, match=r'quote it in YAML: .*: "8080"'):
        read_overrides({a.EXCLUDE_INBOUND_PORTS: 8080}, CFG)


def test_the_request_may_not_exceed_the_limit_and_the_blame_goes_to_what_was_set() -> None:
    with pytest.raises(AnnotationError) as info:
        read_overrides({a.PROXY_CPU_LIMIT: "50m"}, CFG)
    assert info.value.name == a.PROXY_CPU_LIMIT
    with pytest.raises(AnnotationError) as info:
        read_overrides({a.PROXY_CPU: "3", a.PROXY_CPU_LIMIT: "2"}, CFG)
    assert info.value.name == a.PROXY_CPU
    # No limit configured: any request is fine.
    cfg = load_config({"proxy": {"memory_limit": ""}})
    assert read_overrides({a.PROXY_MEMORY: "64Gi"}, cfg).memory_request == "64Gi"


@pytest.mark.parametrize(
    ("text", "value"),
    [("100m", "0.1"), ("1", "1"), ("1Ki", "1024"), ("1.5Gi", "1610612736"), ("2k", "2000"),
     ("1e3", "1000"), ("5E", "5000000000000000000"), ("250u", "0.000250")],
)  # fmt: skip
def test_quantities_compare_by_value(text: str, value: str) -> None:
    from decimal import Decimal

    assert quantity_value(text) == Decimal(value)


def test_sidemesh_keys_lists_what_check_reports() -> None:
    keys = sidemesh_keys(
        {"sidemesh.io/inject": "true", "app": "x"},
        {
            "sidemesh.io/proxy-cpu": "1",
            "traffic.sidemesh.io/exclude-inbound-ports": "1",
            "o": "x",
            "sidemesh.io/proxy-cpus": "2",
        },
    )
    assert keys == [
        "label sidemesh.io/inject",
        "annotation sidemesh.io/proxy-cpu",
        "annotation traffic.sidemesh.io/exclude-inbound-ports",
        "annotation sidemesh.io/proxy-cpus (unknown, ignored)",
    ]
