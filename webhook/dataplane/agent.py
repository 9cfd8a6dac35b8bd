"""``sidemesh proxy``: the sidecar agent.

In order: read the pod's facts (flags + downward-API environment), serve the app probes on
15020, generate a key and get a certificate from the CA (retrying with backoff, saying why),
install it, render the Envoy bootstrap, start Envoy as the proxy uid, and then supervise:

* Envoy exits on its own → the agent exits non-zero, so the kubelet restarts the container;
* half of the certificate's lifetime has passed → a new key and certificate, swapped in
  atomically; Envoy rereads them from its watched directory (no restart, no dropped
  connection); a failed renewal is retried with backoff while the old certificate is valid;
* SIGTERM/SIGINT → ``/drain_listeners?graceful`` on the admin port (readiness turns 503, HTTP
  peers are told to close), wait until the capture listeners have no connection left or the
  drain time is over, then stop Envoy and exit 0.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import random
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from webhook import names
from webhook.config import DEFAULTS, INBOUND_MTLS_MODES, InboundMTLS, Ports
from webhook.dataplane.ads_bootstrap import XdsOptions, render_ads_bootstrap
from webhook.dataplane.bootstrap import (
    BootstrapOptions,
    local_address_ip_version,
    render_bootstrap,
    render_sds,
    sds_dir,
)
from webhook.dataplane.capture import INBOUND_PASSTHROUGH_SOURCE_V6
from webhook.dataplane.identity import (
    CARequestError,
    Issued,
    build_csr,
    check_issued,
    install_generation,
    new_key,
    renewal_time,
    request_certificate,
)
from webhook.dataplane.probes import parse_probes, start_probe_server
from webhook.errors import ConfigError
from webhook.files import write_atomic
from webhook.values import parse_cidr_list, parse_port, parse_port_list

__all__ = [
    "AgentSettings",
    "api_server_destinations",
    "envoy_command",
    "run_agent",
    "settings_from",
    "wait_ready",
]

LOG = logging.getLogger("sidemesh.proxy")

#: Envoy's log levels for ours (Envoy says "warning" too, and has no "off" below critical).
_ENVOY_LEVELS = {"warning": "warning", "off": "off"}

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
    proxy_uid: int = DEFAULTS.proxy.uid
    proxy_gid: int = DEFAULTS.proxy.gid
    ports: Ports = field(default_factory=Ports)
    #: host:port of the control plane's ADS server; empty: the static ``mesh_cidrs`` bootstrap.
    discovery_address: str = ""
    #: How long Envoy's readiness waits for the first config from the control plane.
    initial_fetch_timeout_s: float = 10.0

    def xds_options(self) -> XdsOptions | None:
        if not self.discovery_address:
            return None
        return XdsOptions(self.discovery_address, "", self.initial_fetch_timeout_s)

    @property
    def spiffe_id(self) -> str:
        return names.spiffe_id(self.trust_domain, self.pod_namespace, self.service_account)

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


def settings_from(flags: Mapping[str, Any], env: Mapping[str, str]) -> AgentSettings:
    """Build the settings from parsed flags and the environment; errors name the variable."""

    def need(var: str) -> str:
        value = env.get(var, "").strip()
        if not value:
            raise ConfigError(f"environment variable {var} is required (downward API)")
        return value

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
    pod_ip = env.get(names.ENV_POD_IP, "").strip() or "127.0.0.1"
    settings = AgentSettings(
        ca_address=str(flags["ca_address"]),
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
        inbound_mtls=mode,
        mesh_cidrs=tuple(cidrs),
        plaintext_ports=plaintext_ports,
        api_servers=api_server_destinations(env),
        app_probes=probes,
        cert_ttl_seconds=int(raw_ttl) if raw_ttl else None,
        discovery_address=env.get(names.ENV_DISCOVERY_ADDRESS, "").strip(),
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


def envoy_command(s: AgentSettings, bootstrap: Path) -> list[str]:
    """How Envoy is started. ``--disable-hot-restart``: otherwise Envoy leaves a shared-memory
    file in /dev/shm (shared by every network namespace) that breaks the next uid-1337 start."""
    return [
        s.envoy_binary,
        "-c",
        str(bootstrap),
        "--disable-hot-restart",
        "--concurrency",
        str(s.concurrency),
        "--log-level",
        _ENVOY_LEVELS.get(s.log_level, s.log_level),
        "--drain-time-s",
        str(max(1, round(s.drain_seconds))),
        "--drain-strategy",
        "immediate",
        "--local-address-ip-version",
        local_address_ip_version(s.bootstrap_options()),
    ]


# --- the run ------------------------------------------------------------------------------


def run_agent(s: AgentSettings, *, now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> int:
    stop = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()  # no logging here: the handler may interrupt the main thread mid-log

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    owner = _owner_for_envoy(s)
    if 6 in s.ip_families and not _on_loopback(INBOUND_PASSTHROUGH_SOURCE_V6):
        # Envoy could not bind its IPv6 hop to the app: every inbound IPv6 connection would
        # fail. init-traffic adds the address; without it, say so rather than fail silently.
        LOG.warning(
            "pod has IPv6 addresses %s but %s is not on lo (init-traffic of this version adds "
            "it): inbound IPv6 connections will fail",
            s.pod_ips,
            INBOUND_PASSTHROUGH_SOURCE_V6,
        )
    # "::" when the pod has IPv6: one socket for both families (an IPv6-first cluster's kubelet
    # probes the pod's IPv6 address)
    host = "::" if 6 in s.ip_families else "0.0.0.0"
    probes = start_probe_server(s.app_probes, pod_ip=s.pod_ip, port=s.ports.probes, host=host)
    try:
        issued, renew_at = _obtain(s, owner, now, stop)
        if issued is None:
            return 0  # asked to stop before we ever had a certificate
        bootstrap = _write_config(s, owner)
        proc = _start_envoy(s, bootstrap)
        LOG.info(
            "envoy started (pid %d) as %s, config %s",
            proc.pid,
            s.spiffe_id,
            f"over ADS from {s.discovery_address}" if s.discovery_address else "static",
        )
        try:
            return _supervise(s, proc, owner, now, stop, issued, renew_at)
        finally:
            _terminate(proc)  # never leave Envoy behind, whatever went wrong above
    finally:
        probes.shutdown()


def _on_loopback(address: str, if_inet6: Path = Path("/proc/net/if_inet6")) -> bool:
    """Whether ``address`` is assigned to ``lo`` (``/proc/net/if_inet6``: 32 hex digits,
    ifindex, prefix length, scope, flags, name)."""
    wanted = ipaddress.IPv6Address(address).exploded.replace(":", "")
    try:
        lines = if_inet6.read_text().splitlines()
    except OSError:  # no IPv6 in this kernel
        return False
    for line in lines:
        fields = line.split()
        if len(fields) == 6 and fields[0] == wanted and fields[5] == "lo":
            return True
    return False


def _owner_for_envoy(s: AgentSettings) -> tuple[int, int] | None:
    """When the agent runs as root (outside a pod), hand Envoy's files to the proxy uid."""
    return (s.proxy_uid, s.proxy_gid) if os.geteuid() == 0 else None


def _obtain(
    s: AgentSettings,
    owner: tuple[int, int] | None,
    now: Callable[[], datetime],
    stop: threading.Event,
    *,
    deadline: datetime | None = None,
) -> tuple[Issued | None, datetime]:
    """A fresh key and certificate, installed; retries with capped, jittered backoff."""
    delay = 0.2
    while not stop.is_set():
        key = new_key()
        try:
            token = s.token_file.read_text().strip()
            chain, bundle = request_certificate(
                s.ca_address,
                csr_pem=build_csr(key, s.spiffe_id),
                token=token,
                bundle_file=s.bundle_file,
                ttl_seconds=s.cert_ttl_seconds,
            )
            received = now()
            issued = check_issued(key, chain, bundle, s.spiffe_id)
            install_generation(s.cert_dir, key, issued, owner=owner)
            renew_at = renewal_time(issued, received)
            LOG.info(
                "certificate for %s valid until %s, renewing at %s",
                s.spiffe_id,
                issued.not_after.isoformat(),
                renew_at.isoformat(),
            )
            return issued, renew_at
        except (CARequestError, OSError) as exc:
            if deadline is not None and now() >= deadline:
                raise CARequestError(f"certificate expired and renewal failed: {exc}") from None
            wait = delay * (0.5 + random.random())
            LOG.warning("no certificate yet (%s); retrying in %.1fs", exc, wait)
            stop.wait(wait)
            delay = min(delay * 2, 15.0)
    return None, now()


def _write_config(s: AgentSettings, owner: tuple[int, int] | None) -> Path:
    opts = s.bootstrap_options()
    sds = Path(sds_dir(str(s.work_dir)))
    sds.mkdir(parents=True, exist_ok=True)
    for name, content in render_sds(opts).items():
        _write_json(sds / name, content, owner)
    bootstrap = s.work_dir / "envoy.json"
    xds = s.xds_options()
    # ADS: the capture listeners come from the control plane. Without an address: the static
    # bootstrap, where "meshed" means "inside mesh_cidrs" (the explicit fallback mode).
    content = render_bootstrap(opts) if xds is None else render_ads_bootstrap(opts, xds)
    _write_json(bootstrap, content, owner)
    if owner is not None:
        for d in (s.work_dir, sds, s.cert_dir):
            os.chown(d, *owner)
    return bootstrap


def _write_json(path: Path, content: object, owner: tuple[int, int] | None) -> None:
    # Envoy watches these files: it must only ever see a complete one.
    write_atomic(path, json.dumps(content, indent=1).encode(), mode=0o644, owner=owner)


def _start_envoy(s: AgentSettings, bootstrap: Path) -> subprocess.Popen[bytes]:
    cmd = envoy_command(s, bootstrap)
    if os.geteuid() == 0 and s.proxy_uid != 0:
        # Envoy's own connections are exempt from capture only because they belong to 1337.
        return subprocess.Popen(cmd, user=s.proxy_uid, group=s.proxy_gid, extra_groups=[])
    return subprocess.Popen(cmd)


def _supervise(
    s: AgentSettings,
    proc: subprocess.Popen[bytes],
    owner: tuple[int, int] | None,
    now: Callable[[], datetime],
    stop: threading.Event,
    issued: Issued,
    renew_at: datetime,
) -> int:
    while True:
        if stop.is_set():
            return _drain_and_stop(s, proc)
        code = proc.poll()
        if code is not None:
            LOG.error("envoy exited with code %s; exiting so that the kubelet restarts us", code)
            return code if code > 0 else 1
        if now() >= renew_at:
            try:
                got, renew_at = _obtain(s, owner, now, stop, deadline=issued.not_after)
            except CARequestError as exc:
                LOG.error("%s", exc)
                _terminate(proc)
                return 1
            if got is not None:
                issued = got
        stop.wait(0.1)


def _admin(s: AgentSettings, path: str, method: str = "GET", timeout: float = 2.0) -> str:
    req = urllib.request.Request(f"http://127.0.0.1:{s.ports.admin}{path}", method=method)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return str(resp.read().decode())


def _active_capture_connections(s: AgentSettings) -> int:
    text = _admin(s, "/stats?filter=^listener\\.(inbound|outbound)\\.downstream_cx_active$")
    return sum(int(line.rsplit(":", 1)[1]) for line in text.splitlines() if ":" in line)


def _drain_and_stop(s: AgentSettings, proc: subprocess.Popen[bytes]) -> int:
    LOG.warning("asked to stop: draining for up to %gs", s.drain_seconds)
    try:
        # First fail readiness (admin /ready, and so 15021, answers 503 once health checks are
        # failed), then drain: HTTP peers are told to close, listeners stop after the drain time.
        _admin(s, "/healthcheck/fail", method="POST")
        _admin(s, "/drain_listeners?graceful", method="POST")
        deadline = time.monotonic() + s.drain_seconds
        open_now = None
        while time.monotonic() < deadline and proc.poll() is None:
            open_now = _active_capture_connections(s)
            if open_now == 0:
                # At the stop message's level, so an owner can tell a clean drain from a cut one.
                LOG.warning("drained: no open connections left, stopping envoy")
                break
            time.sleep(0.1)
        else:
            if open_now:
                LOG.warning("drain time over with %d connection(s) open", open_now)
    except (OSError, urllib.error.URLError, ValueError) as exc:
        LOG.warning("drain via admin failed (%s); stopping envoy", exc)
    code = _terminate(proc)
    LOG.info("envoy stopped (code %s)", code)
    return 0


def _terminate(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


def wait_ready(url: str, timeout: float) -> bool:
    """Poll ``url`` until it answers 200 (``sidemesh proxy wait``, the hold-mode hook)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError, urllib.error.URLError),
            urllib.request.urlopen(url, timeout=1) as resp,
        ):
            if resp.status == 200:
                return True
        time.sleep(0.2)
    return False
