"""The agent's settings: flags and the pod's downward-API environment, read once at start.

Errors name the flag or variable that was wrong (:class:`ConfigError`), so a bad pod spec fails
at start with a message rather than later with a traceback.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from webhook import names
from webhook.config import DEFAULTS, INBOUND_MTLS_MODES, InboundMTLS, Ports
from webhook.dataplane.ads_bootstrap import XdsOptions
from webhook.dataplane.bootstrap import BootstrapOptions
from webhook.dataplane.cacall import parse_ca_address
from webhook.dataplane.probes import parse_probes
from webhook.errors import ConfigError
from webhook.telemetry.workload import labels_from_env, proxy_environment
from webhook.values import parse_cidr_list, parse_port, parse_port_list

__all__ = [
    "ENV_KUBERNETES_HOST",
    "ENV_KUBERNETES_PORTS",
    "AgentSettings",
    "api_server_destinations",
    "settings_from",
]

LOG = logging.getLogger("sidemesh.proxy")

#: The kubelet's environment for the ``kubernetes`` Service in the ``default`` namespace, set in
#: every container (the sidecar's included): where the API server is reached from a pod.
ENV_KUBERNETES_HOST = "KUBERNETES_SERVICE_HOST"
ENV_KUBERNETES_PORTS = ("KUBERNETES_SERVICE_PORT", "KUBERNETES_SERVICE_PORT_HTTPS")


@dataclass(frozen=True)
class AgentSettings:
    """Everything the agent needs, gathered once at start (flags + environment)."""

    ca_address: str
    token_file: Path
    bundle_file: Path
    cert_dir: Path
    work_dir: Path
    envoy_binary: str
    pod_name: str
    pod_namespace: str
    pod_ip: str
    service_account: str
    pod_ips: tuple[str, ...] = ()
    trust_domain: str = DEFAULTS.trust_domain
    inbound_mtls: InboundMTLS = DEFAULTS.inbound_mtls
    mesh_cidrs: tuple[str, ...] = DEFAULTS.mesh_cidrs
    plaintext_ports: tuple[int, ...] = DEFAULTS.plaintext_ports
    api_servers: tuple[tuple[str, int], ...] = ()
    app_probes: dict[str, dict[str, Any]] = field(default_factory=dict)
    cert_ttl_seconds: int | None = None
    log_level: str = DEFAULTS.proxy.log_level
    concurrency: int = DEFAULTS.proxy.concurrency
    drain_seconds: float = 5.0
    #: One CA call, connect to last byte.
    ca_timeout_seconds: float = 10.0
    #: Longest wait between two failed attempts (the backoff's cap).
    retry_max_seconds: float = 30.0
    proxy_uid: int = DEFAULTS.proxy.uid
    proxy_gid: int = DEFAULTS.proxy.gid
    ports: Ports = field(default_factory=Ports)
    #: host:port of the control plane's ADS server; empty: the static ``mesh_cidrs`` bootstrap.
    discovery_address: str = ""
    #: How long Envoy's readiness waits for the first config from the control plane.
    initial_fetch_timeout_s: float = 10.0
    #: The pod labels its workload's name comes from (telemetry), by the downward API.
    workload_labels: dict[str, str] = field(default_factory=dict)

    def xds_options(self) -> XdsOptions | None:
        if not self.discovery_address:
            return None
        return XdsOptions(self.discovery_address, "", self.initial_fetch_timeout_s)

    @property
    def spiffe_id(self) -> str:
        return names.spiffe_id(self.trust_domain, self.pod_namespace, self.service_account)

    def envoy_environment(self) -> dict[str, str]:
        """What Envoy's environment adds to the agent's: who this sidecar is, for the
        telemetry its listeners compile (``%ENVIRONMENT(…)%``)."""
        return proxy_environment(
            self.pod_name, self.pod_namespace, self.spiffe_id, self.workload_labels
        )

    @property
    def ip_families(self) -> set[int]:
        """The address families of the pod's IPs (``POD_IPS``, else ``POD_IP``)."""
        ips = self.pod_ips or (self.pod_ip,)
        return {6 if ":" in ip else 4 for ip in ips}

    def bootstrap_options(self) -> BootstrapOptions:
        families = self.ip_families
        return BootstrapOptions(
            pod_name=self.pod_name,
            pod_namespace=self.pod_namespace,
            service_account=self.service_account,
            trust_domain=self.trust_domain,
            inbound_mtls=self.inbound_mtls,
            mesh_cidrs=self.mesh_cidrs,
            plaintext_ports=self.plaintext_ports,
            api_servers=self.api_servers,
            cert_dir=str(self.cert_dir),
            work_dir=str(self.work_dir),
            ports=self.ports,
            ipv6=6 in families,
            ipv4=4 in families,
        )


class _MeshEnv(NamedTuple):
    """The mesh settings the injector wrote into the proxy's environment, parsed."""

    inbound_mtls: InboundMTLS
    mesh_cidrs: tuple[str, ...]
    plaintext_ports: tuple[int, ...]
    app_probes: dict[str, dict[str, Any]]
    cert_ttl_seconds: int | None


def _mesh_env(env: Mapping[str, str]) -> _MeshEnv:
    """Parse the injector's variables (defaults when absent); ConfigError names the variable."""
    mode = env.get(names.ENV_INBOUND_MTLS, "").strip().upper() or DEFAULTS.inbound_mtls
    if mode not in INBOUND_MTLS_MODES:
        raise ConfigError(f"{names.ENV_INBOUND_MTLS}={mode!r}: expected PERMISSIVE or STRICT")
    raw_cidrs = env.get(names.ENV_MESH_CIDRS, ",".join(DEFAULTS.mesh_cidrs))
    try:
        cidrs = parse_cidr_list(raw_cidrs)
    except ValueError as exc:
        raise ConfigError(f"{names.ENV_MESH_CIDRS}={raw_cidrs!r}: {exc}") from None
    raw_plain = env.get(names.ENV_PLAINTEXT_PORTS, ",".join(map(str, DEFAULTS.plaintext_ports)))
    try:
        plaintext_ports = parse_port_list(raw_plain)
    except ValueError as exc:
        raise ConfigError(f"{names.ENV_PLAINTEXT_PORTS}={raw_plain!r}: {exc}") from None
    assert isinstance(plaintext_ports, tuple)  # no "*" without allow_all
    raw_probes = env.get(names.ENV_APP_PROBES, "")
    try:
        probes = parse_probes(raw_probes)
    except ValueError as exc:
        raise ConfigError(f"{names.ENV_APP_PROBES}: {exc}") from None
    raw_ttl = env.get(names.ENV_CERT_TTL, "").strip()
    if raw_ttl and not raw_ttl.isdigit():
        raise ConfigError(f"{names.ENV_CERT_TTL}={raw_ttl!r}: expected seconds")
    return _MeshEnv(mode, tuple(cidrs), plaintext_ports, probes, int(raw_ttl) if raw_ttl else None)


def settings_from(flags: Mapping[str, Any], env: Mapping[str, str]) -> AgentSettings:
    """Build the settings from parsed flags and the environment; errors name the variable."""

    def need(var: str) -> str:
        value = env.get(var, "").strip()
        if not value:
            raise ConfigError(f"environment variable {var} is required (downward API)")
        return value

    mesh = _mesh_env(env)
    pod_ip = env.get(names.ENV_POD_IP, "").strip() or "127.0.0.1"
    try:
        parse_ca_address(str(flags["ca_address"]))
    except ValueError as exc:
        raise ConfigError(f"--ca-address: {exc}") from None
    settings = AgentSettings(
        ca_address=str(flags["ca_address"]),
        ca_timeout_seconds=float(flags.get("ca_timeout", 10.0)),
        retry_max_seconds=float(flags.get("retry_max_seconds", 30.0)),
        token_file=Path(flags["token_file"]),
        bundle_file=Path(flags["bundle_file"]),
        cert_dir=Path(flags["cert_dir"]),
        work_dir=Path(flags["work_dir"]),
        envoy_binary=str(flags["envoy_binary"]),
        log_level=str(flags["log_level"]),
        concurrency=int(flags["concurrency"]),
        drain_seconds=float(flags.get("drain_seconds", 5.0)),
        pod_name=need(names.ENV_POD_NAME),
        pod_namespace=need(names.ENV_POD_NAMESPACE),
        pod_ip=pod_ip.split(",")[0],
        pod_ips=tuple(ip.strip() for ip in env.get(names.ENV_POD_IPS, "").split(",") if ip.strip()),
        service_account=env.get(names.ENV_SERVICE_ACCOUNT, "").strip()
        or names.DEFAULT_SERVICE_ACCOUNT,
        trust_domain=env.get(names.ENV_TRUST_DOMAIN, "").strip() or DEFAULTS.trust_domain,
        inbound_mtls=mesh.inbound_mtls,
        mesh_cidrs=mesh.mesh_cidrs,
        plaintext_ports=mesh.plaintext_ports,
        api_servers=api_server_destinations(env),
        app_probes=mesh.app_probes,
        cert_ttl_seconds=mesh.cert_ttl_seconds,
        discovery_address=env.get(names.ENV_DISCOVERY_ADDRESS, "").strip(),
        workload_labels=labels_from_env(env),
    )
    if settings.discovery_address:
        try:
            XdsOptions(settings.discovery_address).host_port()
        except ValueError as exc:
            raise ConfigError(f"{names.ENV_DISCOVERY_ADDRESS}: {exc}") from None
    try:
        settings.spiffe_id  # noqa: B018 - checked once here, not when the CA is first asked
    except ValueError as exc:
        where = f"{names.ENV_TRUST_DOMAIN}, {names.ENV_POD_NAMESPACE}, {names.ENV_SERVICE_ACCOUNT}"
        raise ConfigError(f"no SPIFFE id from {where}: {exc}") from None
    return settings


def api_server_destinations(env: Mapping[str, str]) -> tuple[tuple[str, int], ...]:
    """The API server's Service ``(ip, port)`` pairs from the kubelet's environment.

    It sits inside the mesh CIDRs but never has a sidecar, so the outbound listener must pass
    it through as it is. A value that is not an IP address or a port (someone overrode the
    variable with a host name) is skipped with a warning rather than failing the pod: the
    worst case is the behaviour without this exemption."""
    raw_host = env.get(ENV_KUBERNETES_HOST, "").strip()
    if not raw_host:
        return ()
    try:
        ip = str(ipaddress.ip_address(raw_host.strip("[]")))
    except ValueError:
        LOG.warning(
            "%s=%r is not an IP address: not exempted from mTLS", ENV_KUBERNETES_HOST, raw_host
        )
        return ()
    out: list[tuple[str, int]] = []
    for var in ENV_KUBERNETES_PORTS:
        raw_port = env.get(var, "").strip()
        if not raw_port:
            continue
        try:
            port = parse_port(raw_port)
        except ValueError as exc:
            LOG.warning("%s=%r: %s; not exempted from mTLS", var, raw_port, exc)
            continue
        if (ip, port) not in out:
            out.append((ip, port))
    return tuple(out)
