"""The mesh config: frozen dataclasses, every default in this one file.

A config file is YAML whose keys mirror the dataclass fields (``proxy.image``,
``ca.max_ttl_seconds`` …). It is parsed once at start-up by :func:`load_config`; an unknown key,
or a value that breaks a rule of :mod:`webhook.config_rules`, raises
:class:`~webhook.errors.ConfigError` naming the dotted key and the value, so a typo never
silently falls back to a default. Pure apart from :func:`load_config_file`.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Union, get_args, get_origin, get_type_hints

from webhook import names
from webhook.config_rules import bad_value, validate
from webhook.errors import ConfigError

__all__ = [
    "DEFAULTS",
    "INBOUND_MTLS_MODES",
    "LOG_LEVELS",
    "RESERVED_PORTS",
    "CAConfig",
    "ClientLimits",
    "InboundMTLS",
    "LogLevel",
    "MeshConfig",
    "Ports",
    "ProxyConfig",
    "TelemetryConfig",
    "WebhookConfig",
    "load_config",
    "load_config_file",
]

InboundMTLS = Literal["PERMISSIVE", "STRICT"]
LogLevel = Literal["trace", "debug", "info", "warning", "error", "critical", "off"]
INBOUND_MTLS_MODES: tuple[InboundMTLS, ...] = get_args(InboundMTLS)
LOG_LEVELS: tuple[LogLevel, ...] = get_args(LogLevel)

DEFAULT_IMAGE = "ghcr.io/sidemesh/sidemesh:0.1.0"


@dataclass(frozen=True)
class Ports:
    """The proxy's well-known ports. Apps may not declare any of them (see RESERVED_PORTS)."""

    outbound: int = 15001
    """Outbound capture: every TCP connection the app opens is redirected here."""
    inbound: int = 15006
    """Inbound capture: every TCP connection to the pod (except excluded ports) lands here."""
    admin: int = 15000
    """Envoy admin, bound to 127.0.0.1 only."""
    probes: int = 15020
    """Rewritten app probes (``/app-health/<container>/<livez|readyz|startupz>``)."""
    health: int = 15021
    """Proxy health, ``/healthz/ready``: the proxy's own readiness and startup probe."""
    stats: int = 15090
    """Prometheus scrape endpoint, ``/stats/prometheus``."""

    def all(self) -> tuple[int, ...]:
        return (self.admin, self.outbound, self.inbound, self.probes, self.health, self.stats)

    def never_captured_inbound(self) -> tuple[int, ...]:
        """Inbound ports that are always excluded from capture (kubelet and Prometheus)."""
        return (self.probes, self.health, self.stats)


RESERVED_PORTS: tuple[int, ...] = Ports().all()


@dataclass(frozen=True)
class ProxyConfig:
    """How the sidecar and the init container look."""

    image: str = DEFAULT_IMAGE
    """Image of the proxy container (runs ``sidemesh proxy`` and Envoy)."""
    init_image: str = DEFAULT_IMAGE
    """Image of the init container (runs ``sidemesh init-traffic``)."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """Pull policy of both injected containers."""
    uid: int = 1337
    """The proxy's uid; traffic of this uid is never captured. Apps may not run as it."""
    gid: int = 1337
    """The proxy's gid; traffic of this gid is never captured either."""
    cpu_request: str = "100m"
    """Proxy CPU request (a Kubernetes quantity)."""
    memory_request: str = "128Mi"
    """Proxy memory request."""
    cpu_limit: str = "2"
    """Proxy CPU limit; empty string for none."""
    memory_limit: str = "1Gi"
    """Proxy memory limit; empty string for none."""
    native_sidecar: bool = True
    """Run the proxy as a native sidecar (an init container with ``restartPolicy: Always``)."""
    hold_application_until_proxy_starts: bool = False
    """Classic mode only: put the proxy first and block app start until it is ready."""
    log_level: LogLevel = "warning"
    """The proxy's log level (agent and Envoy)."""
    concurrency: int = 1
    """Envoy worker threads (``--concurrency``). One pod's traffic seldom needs more than one, and
    every thread takes memory and a share of the node's cores from the app."""
    cert_ttl_seconds: int = 86400
    """Lifetime the agent asks for its workload certificate; renewed at half of it."""


@dataclass(frozen=True)
class CAConfig:
    """The bundled mini-CA."""

    default_ttl_seconds: int = 86400
    """Workload certificate lifetime when the request names none (24 h)."""
    max_ttl_seconds: int = 7 * 86400
    """Longest lifetime a request may ask for; longer requests are refused, not clamped."""
    min_ttl_seconds: int = 10
    """Shortest lifetime a request may ask for."""
    serving_cert_ttl_seconds: int = 90 * 86400
    """Lifetime of the webhook's own serving certificate."""
    rate_per_identity_per_minute: int = 60
    """Certificate requests one SPIFFE identity may make per minute before 429."""
    max_body_bytes: int = 64 * 1024
    """Largest certificate request body accepted (413 above)."""
    unauthenticated_per_address_per_minute: int = 30
    """Requests without a valid token one source address may make per minute before 429."""
    max_token_lifetime_seconds: int = 86400
    """Longest ``exp - iat`` of a service-account token the CA accepts (checked with a JWKS)."""


@dataclass(frozen=True)
class WebhookConfig:
    """The admission endpoint."""

    max_body_bytes: int = 3 * 1024 * 1024
    """Largest AdmissionReview accepted (413 above); the API server sends at most ~3 MiB."""


@dataclass(frozen=True)
class ClientLimits:
    """What one client of ``sidemesh serve`` (webhook and CA) may hold; beyond, 4xx or closed.

    Body sizes are ``webhook.max_body_bytes`` and ``ca.max_body_bytes``; the failed-token
    budget per source address is ``ca.unauthenticated_per_address_per_minute``.
    """

    max_request_line_bytes: int = 8 * 1024
    """Longest request target (414 above)."""
    max_header_bytes: int = 32 * 1024
    """Request line plus headers, in bytes (431 above)."""
    max_headers: int = 100
    """Most header fields in one request (431 above)."""
    header_timeout_seconds: float = 10.0
    """From the connection (or the first byte after an idle keep-alive) to the end of the
    headers; then 408 and the connection is closed."""
    body_timeout_seconds: float = 30.0
    """From the end of the headers to the end of the body (Content-Length or the last chunk);
    then 408 and the connection is closed."""
    idle_timeout_seconds: float = 120.0
    """Idle keep-alive. Longer than the API server keeps idle webhook connections (90 s), so
    that it always closes first and never sends a review on a connection being closed."""
    max_connections: int = 1000
    """Open connections per worker process. A new connection beyond it closes the oldest one
    that has not sent a whole request (or, failing that, the oldest idle one); if every
    connection is busy, the new one is closed."""


@dataclass(frozen=True)
class TelemetryConfig:
    """What the control plane compiles into every sidecar (``docs/telemetry.md``)."""

    metrics: bool = True
    """Golden metrics (requests, latency, bytes by source and destination) on each sidecar's
    ``/stats/prometheus``."""
    access_log: str = "1%"
    """JSON access log on the proxy's stdout: ``off``, ``errors`` (failed requests and
    connections only) or ``N%`` (failed ones plus N percent of the rest). A pod overrides it
    with the annotation ``telemetry.sidemesh.io/access-log``."""
    tracing_collector: str = ""
    """``host:port`` of an OTLP/gRPC trace collector (OpenTelemetry Collector, Jaeger, Tempo);
    empty: no tracing."""
    tracing_sampling: float = 1.0
    """Percent of requests that start a new trace (0-100); a request that arrives with a
    sampled ``traceparent`` is always traced."""


@dataclass(frozen=True)
class MeshConfig:
    """Everything that shapes an injected pod and the control plane. Defaults are the mesh's."""

    trust_domain: str = "cluster.local"
    """SPIFFE trust domain: ids are ``spiffe://<trust_domain>/ns/<ns>/sa/<sa>``."""
    ca_address: str = f"https://{names.SERVICE_NAME}.{names.CONTROL_PLANE_NAMESPACE}.svc:443"
    """Where proxies send their CSRs (``POST <ca_address>/v1/certificates``)."""
    discovery_address: str = "sidemesh-discovery.sidemesh-system.svc:15012"
    """``host:port`` of the control plane's xDS (ADS) server, which sidecars dial over mTLS.
    An empty string means no control plane: sidecars keep the static ``mesh_cidrs`` bootstrap."""
    inbound_mtls: InboundMTLS = "PERMISSIVE"
    """Default inbound mode: PERMISSIVE accepts mTLS and plaintext, STRICT mTLS only."""
    mesh_cidrs: tuple[str, ...] = ("10.0.0.0/8",)
    """Destinations treated as meshed (outbound mTLS); the rest is plain passthrough."""
    plaintext_ports: tuple[int, ...] = (53,)
    """Outbound destination ports that stay plaintext even inside ``mesh_cidrs`` (default: DNS
    over TCP, since kube-dns has no sidecar). The API server's Service address is always
    plaintext too; the proxy reads it from ``KUBERNETES_SERVICE_HOST``/``_PORT``."""
    rewrite_probes: bool = True
    """Rewrite app HTTP/TCP/gRPC probes to the proxy's probe port."""
    cni: bool = False
    """CNI mode: the node's sidemesh CNI plugin installs the capture rules, so pods get no
    NET_ADMIN init container, only the unprivileged ``sidemesh-validate`` check. Needs
    ``sidemesh cni install`` on every node; per pod: annotation ``sidemesh.io/cni``."""
    ignored_namespaces: tuple[str, ...] = (
        "kube-system",
        "kube-public",
        "kube-node-lease",
        names.CONTROL_PLANE_NAMESPACE,
    )
    """Namespaces never injected, whatever their labels say."""
    ports: Ports = field(default_factory=Ports)
    """The proxy's well-known ports."""
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    """The sidecar and init container."""
    ca: CAConfig = field(default_factory=CAConfig)
    """The mini-CA."""
    webhook: WebhookConfig = field(default_factory=WebhookConfig)
    """The admission endpoint."""
    limits: ClientLimits = field(default_factory=ClientLimits)
    """What one HTTPS client may hold of the server (sizes, times, connections)."""
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    """Metrics, access logs and traces the sidecars produce."""

    def __post_init__(self) -> None:
        validate(self)


#: The mesh's defaults as one value. The roles that run without a config file (the proxy
#: agent, the Envoy bootstrap, ``init-traffic``, the CLI flags) take their defaults from here
#: instead of repeating the literals, so changing a default above changes it everywhere.
DEFAULTS: Final = MeshConfig()


# --- loading -------------------------------------------------------------------------------


def load_config(data: Mapping[str, Any] | None) -> MeshConfig:
    """Build a :class:`MeshConfig` from a parsed YAML mapping (``None`` = all defaults)."""
    if data is None:
        return MeshConfig()
    if not isinstance(data, Mapping):
        raise ConfigError(f"config must be a mapping of keys, got {type(data).__name__}")
    built = _build(MeshConfig, data, prefix="")
    assert isinstance(built, MeshConfig)
    return built


def load_config_file(path: str | Path | None) -> MeshConfig:
    """Read and validate a YAML config file; ``None`` gives the defaults."""
    import yaml  # here: the CNI plugin imports this module and must stay standard-library only

    if path is None:
        return MeshConfig()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    return load_config(data)


def _build(cls: type[Any], data: Mapping[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, raw in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key {dotted!r} (known here: {known})")
        kwargs[key] = _coerce(hints[key], raw, dotted)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # pragma: no cover - guarded by _coerce
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'}: {exc}") from None


def _coerce(hint: Any, raw: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if not isinstance(raw, Mapping):
            raise bad_value(key, raw, "expected a mapping")
        return _build(hint, raw, prefix=f"{key}.")
    origin = get_origin(hint)
    if origin is Literal:
        allowed = get_args(hint)
        if raw not in allowed:
            raise bad_value(key, raw, f"expected one of {', '.join(map(str, allowed))}")
        return raw
    if origin is tuple:
        if isinstance(raw, str) or not isinstance(raw, list | tuple):
            raise bad_value(key, raw, "expected a list")
        item_type = get_args(hint)[0]
        return tuple(_coerce(item_type, item, key) for item in raw)
    if origin in (Union, types.UnionType):  # pragma: no cover - no optional fields yet
        raise bad_value(key, raw, "unsupported type")
    if hint is bool:
        if not isinstance(raw, bool):
            raise bad_value(key, raw, "expected true or false")
        return raw
    if hint is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise bad_value(key, raw, "expected an integer")
        return raw
    if hint is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise bad_value(key, raw, "expected a number")
        return float(raw)
    if hint is str:
        if not isinstance(raw, str):
            raise bad_value(key, raw, "expected a string")
        return raw
    raise bad_value(key, raw, f"unsupported type {hint!r}")  # pragma: no cover
