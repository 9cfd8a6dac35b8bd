"""``sidemesh proxy``: the sidecar agent.

In order: read the pod's facts (:mod:`webhook.dataplane.settings`), serve the app probes,
the agent's ``/metrics`` and (ADS mode) the sidecar's ``/stats/prometheus``
(:mod:`webhook.dataplane.scrape`) on 15020, get a certificate (:mod:`webhook.dataplane.renew`:
a fresh key, one bounded CA call, the answer checked against the pod's own trust bundle,
retried with capped, jittered backoff, saying why), install it, render the Envoy bootstrap,
start Envoy as the proxy uid, and then supervise:

* Envoy exits on its own → the agent exits non-zero, so the kubelet restarts the container;
* half of the certificate's lifetime has passed → a new key and certificate, swapped in
  atomically; Envoy rereads them from its watched directory (no restart, no dropped
  connection); a failed renewal is retried with backoff while the old certificate is valid;
* the certificate expires and the CA still fails → readiness turns false (Envoy's health check
  is failed), the log and ``sidemesh_agent_certificate_expired`` say why, and the agent keeps
  trying; the next good certificate makes the pod ready again;
* SIGTERM/SIGINT, at any moment (a CA call in flight is abandoned at once) →
  ``/drain_listeners?graceful`` on the admin port (readiness turns 503, HTTP peers are told to
  close), wait until the capture listeners have no connection left or the drain time is over,
  then stop Envoy and exit 0.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from webhook import names
from webhook.dataplane.ads_bootstrap import render_ads_bootstrap
from webhook.dataplane.bootstrap import (
    local_address_ip_version,
    render_bootstrap,
    render_sds,
    sds_dir,
)
from webhook.dataplane.capture import INBOUND_PASSTHROUGH_SOURCE_V6
from webhook.dataplane.identity import CARequestError, Issued, renewal_time
from webhook.dataplane.probes import Page, start_probe_server
from webhook.dataplane.renew import AgentStatus, Backoff, CertificateSource
from webhook.dataplane.scrape import envoy_stats_page
from webhook.dataplane.settings import AgentSettings, api_server_destinations, settings_from
from webhook.files import write_atomic
from webhook.telemetry.metrics import own_labels
from webhook.telemetry.workload import ENV_NAMESPACE, ENV_PRINCIPAL, ENV_WORKLOAD

__all__ = [
    "AgentSettings",
    "api_server_destinations",
    "envoy_command",
    "run_agent",
    "settings_from",
]

LOG = logging.getLogger("sidemesh.proxy")

#: Envoy's log levels for ours (Envoy says "warning" too, and has no "off" below critical).
_ENVOY_LEVELS = {"warning": "warning", "off": "off"}


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
    status = AgentStatus()
    probes = start_probe_server(
        s.app_probes, pod_ip=s.pod_ip, port=s.ports.probes, host=host, pages=_pages(s, status)
    )
    source = CertificateSource(
        ca_address=s.ca_address,
        token_file=s.token_file,
        bundle_file=s.bundle_file,
        cert_dir=s.cert_dir,
        spiffe_id=s.spiffe_id,
        ttl_seconds=s.cert_ttl_seconds,
        owner=owner,
        request_timeout=s.ca_timeout_seconds,
    )
    backoff = Backoff(cap=s.retry_max_seconds)
    try:
        issued = _obtain(source, now, stop, status, backoff)
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
            keeper = _Keeper(s, source, now, stop, status, backoff, issued)
            return keeper.supervise(proc)
        finally:
            _terminate(proc)  # never leave Envoy behind, whatever went wrong above
    finally:
        probes.shutdown()


def _pages(s: AgentSettings, status: AgentStatus) -> dict[str, Page]:
    """The agent's own metrics, and (ADS mode) Envoy's with this sidecar's labels added."""
    pages: dict[str, Page] = {"/metrics": lambda _query: (200, status.prometheus())}
    if s.discovery_address:
        env = s.envoy_environment()
        own = own_labels(env[ENV_WORKLOAD], env[ENV_NAMESPACE], env[ENV_PRINCIPAL])
        pages[names.STATS_PATH] = envoy_stats_page(s.ports.admin, own)
    return pages


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
    source: CertificateSource,
    now: Callable[[], datetime],
    stop: threading.Event,
    status: AgentStatus,
    backoff: Backoff,
) -> Issued | None:
    """The first certificate, installed; every failure waits its backoff step."""
    while not stop.is_set():
        try:
            issued = source.attempt(now, stop, status)
        except CARequestError as exc:
            if stop.is_set():
                break
            wait = backoff.delay()
            LOG.warning("no certificate yet (%s); retrying in %.1fs", exc, wait)
            stop.wait(wait)
            continue
        backoff.reset()
        _log_installed(issued, renewal_time(issued, now()))
        return issued
    return None


def _log_installed(issued: Issued, renew_at: datetime) -> None:
    LOG.info(
        "certificate for %s valid until %s, renewing at %s",
        issued.spiffe_id,
        issued.not_after.isoformat(),
        renew_at.isoformat(),
    )


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
    env = {**os.environ, **s.envoy_environment()}
    if os.geteuid() == 0 and s.proxy_uid != 0:
        # Envoy's own connections are exempt from capture only because they belong to 1337.
        return subprocess.Popen(cmd, user=s.proxy_uid, group=s.proxy_gid, extra_groups=[], env=env)
    return subprocess.Popen(cmd, env=env)


class _Keeper:
    """Supervises Envoy and keeps its certificate fresh.

    Renewal starts at half-life and retries with backoff while the certificate is valid. If it
    expires with the CA still failing, the pod stops being ready (Envoy's health check is
    failed, so 15021 answers 503 and ``sidemesh_agent_certificate_expired`` is 1) and the
    agent keeps trying, at the backoff's pace; the first good certificate makes it ready again.
    Envoy keeps running throughout: connections that are open stay open."""

    def __init__(
        self,
        s: AgentSettings,
        source: CertificateSource,
        now: Callable[[], datetime],
        stop: threading.Event,
        status: AgentStatus,
        backoff: Backoff,
        issued: Issued,
    ) -> None:
        self.s, self.source, self.now, self.stop = s, source, now, stop
        self.status, self.backoff, self.issued = status, backoff, issued
        self.next_try = renewal_time(issued, now())

    def supervise(self, proc: subprocess.Popen[bytes]) -> int:
        while True:
            if self.stop.is_set():
                return _drain_and_stop(self.s, proc)
            code = proc.poll()
            if code is not None:
                LOG.error("envoy exited with code %s; exiting: the kubelet restarts us", code)
                return code if code > 0 else 1
            if self.now() >= self.issued.not_after and not self.status.expired:
                self._expired()
            if self.now() >= self.next_try:
                self._renew()
            self.stop.wait(0.1)

    def _renew(self) -> None:
        try:
            issued = self.source.attempt(self.now, self.stop, self.status)
        except CARequestError as exc:
            if self.stop.is_set():
                return
            wait = self.backoff.delay()
            self.next_try = self.now() + timedelta(seconds=wait)
            LOG.warning(
                "certificate renewal failed (%s); retrying in %.1fs (current one valid until %s)",
                exc,
                wait,
                self.issued.not_after.isoformat(),
            )
            return
        self.backoff.reset()
        self.issued = issued
        self.next_try = renewal_time(issued, self.now())
        _log_installed(issued, self.next_try)
        if self.status.expired:
            self._set_health(ok=True)
            with self.status.lock:
                self.status.expired = False
            LOG.warning("a valid certificate is installed again: readiness restored")

    def _expired(self) -> None:
        with self.status.lock:
            self.status.expired = True
            why = self.status.last_error or "no renewal attempt succeeded"
        LOG.error(
            "certificate expired at %s and no new one could be obtained (%s): readiness is false "
            "(sidemesh_agent_certificate_expired 1) until the CA answers",
            self.issued.not_after.isoformat(),
            why,
        )
        self._set_health(ok=False)

    def _set_health(self, *, ok: bool) -> None:
        path = "/healthcheck/ok" if ok else "/healthcheck/fail"
        try:
            _admin(self.s, path, method="POST")
        except (OSError, urllib.error.URLError, ValueError) as exc:
            LOG.warning("could not set envoy's health (%s): %s", path, exc)


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
