"""The rules every mesh config field must satisfy (pure).

:class:`~webhook.config.MeshConfig` runs :func:`validate` when it is built, so a config that
breaks a rule cannot exist, however it was made (a file, the CLI flags, a test). A broken rule
is a :class:`~webhook.errors.ConfigError` naming the dotted key, the value and why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from webhook import names
from webhook.errors import ConfigError
from webhook.telemetry.settings import parse_access_log
from webhook.values import check_port, parse_cidr, parse_quantity

if TYPE_CHECKING:  # the config imports this module to validate itself
    from webhook.config import (
        CAConfig,
        ClientLimits,
        MeshConfig,
        Ports,
        ProxyConfig,
        TelemetryConfig,
    )

__all__ = ["bad_value", "validate"]


def bad_value(key: str, value: object, why: str) -> ConfigError:
    return ConfigError(f"config key {key!r} has bad value {value!r}: {why}")


def _check(parser: Callable[[Any], object], key: str, value: Any) -> None:
    """``value`` passes ``parser`` (one of :mod:`webhook.values`, the rules annotations and the
    init container's flags follow too), or ConfigError naming the key, the value and why."""
    try:
        parser(value)
    except ValueError as exc:
        raise bad_value(key, value, str(exc)) from None


def validate(cfg: MeshConfig) -> None:
    """Every field checked, section by section, in the order of the config file."""
    _validate_mesh(cfg)
    _validate_ports(cfg.ports)
    _validate_proxy(cfg.proxy)
    _validate_ca(cfg.ca, cfg.proxy)
    _validate_limits(cfg.limits)
    _validate_telemetry(cfg.telemetry)
    if cfg.webhook.max_body_bytes < 1024:
        raise bad_value("webhook.max_body_bytes", cfg.webhook.max_body_bytes, "at least 1024")


def _validate_mesh(cfg: MeshConfig) -> None:
    td = cfg.trust_domain
    if not names.is_trust_domain(td):
        raise bad_value("trust_domain", td, "a lower-case DNS-like name without '/' or ':'")
    if not cfg.ca_address.startswith("https://"):
        raise bad_value("ca_address", cfg.ca_address, "must be an https:// URL")
    if cfg.discovery_address and not _is_host_port(cfg.discovery_address):
        raise bad_value(
            "discovery_address", cfg.discovery_address, "expected host:port (or empty for none)"
        )
    for cidr in cfg.mesh_cidrs:
        _check(parse_cidr, "mesh_cidrs", cidr)
    for port in cfg.plaintext_ports:
        _check(check_port, "plaintext_ports", port)


def _validate_ports(cfg: Ports) -> None:
    ports = cfg.all()
    port_keys = ("admin", "outbound", "inbound", "probes", "health", "stats")
    for name_, port in zip(port_keys, ports, strict=True):
        _check(check_port, f"ports.{name_}", port)
    if len(set(ports)) != len(ports):
        raise bad_value("ports", ports, "the proxy's ports must be distinct")


def _validate_proxy(px: ProxyConfig) -> None:
    for key in ("image", "init_image"):
        image = getattr(px, key)
        if not image or any(ch.isspace() for ch in image):
            raise bad_value(f"proxy.{key}", image, "an image reference without whitespace")
    for key in ("cpu_request", "memory_request", "cpu_limit", "memory_limit"):
        value = getattr(px, key)
        if value == "" and key.endswith("_limit"):
            continue
        try:
            parse_quantity(value)
        except ValueError as exc:
            raise bad_value(f"proxy.{key}", value, str(exc)) from None
    for key in ("uid", "gid"):
        if not 1 <= getattr(px, key) < 2**31:
            raise bad_value(f"proxy.{key}", getattr(px, key), "must be a positive id, not root")
    if px.concurrency < 1:
        raise bad_value("proxy.concurrency", px.concurrency, "must be at least 1")


def _validate_ca(ca: CAConfig, px: ProxyConfig) -> None:
    if not 1 <= ca.min_ttl_seconds <= ca.default_ttl_seconds <= ca.max_ttl_seconds:
        raise bad_value(
            "ca.default_ttl_seconds",
            ca.default_ttl_seconds,
            "need 1 <= min_ttl_seconds <= default_ttl_seconds <= max_ttl_seconds",
        )
    if not ca.min_ttl_seconds <= px.cert_ttl_seconds <= ca.max_ttl_seconds:
        raise bad_value("proxy.cert_ttl_seconds", px.cert_ttl_seconds, "outside the CA's TTL range")
    for key in ("rate_per_identity_per_minute", "max_body_bytes", "serving_cert_ttl_seconds"):
        if getattr(ca, key) < 1:
            raise bad_value(f"ca.{key}", getattr(ca, key), "must be positive")
    for key in ("unauthenticated_per_address_per_minute", "max_token_lifetime_seconds"):
        if getattr(ca, key) < 1:
            raise bad_value(f"ca.{key}", getattr(ca, key), "must be positive")


def _validate_limits(limits: ClientLimits) -> None:
    for key, value in dataclasses.asdict(limits).items():
        if not value > 0:
            raise bad_value(f"limits.{key}", value, "must be positive")
    if limits.max_header_bytes < limits.max_request_line_bytes:
        raise bad_value(
            "limits.max_header_bytes", limits.max_header_bytes, "below max_request_line_bytes"
        )


def _validate_telemetry(tm: TelemetryConfig) -> None:
    _check(parse_access_log, "telemetry.access_log", tm.access_log)
    if tm.tracing_collector and not _is_host_port(tm.tracing_collector):
        raise bad_value(
            "telemetry.tracing_collector", tm.tracing_collector, "expected host:port (or empty)"
        )
    if not 0 <= tm.tracing_sampling <= 100:
        raise bad_value("telemetry.tracing_sampling", tm.tracing_sampling, "a percentage, 0-100")


def _is_host_port(value: str) -> bool:
    """``host:port`` with a port in 1-65535; an IPv6 host is written in brackets."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        return False
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        return ":" in host and "/" not in host
    return bool(host) and not any(ch in host for ch in ":/ ")
