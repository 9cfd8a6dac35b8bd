"""Test helpers for the control plane: a mini-CA with workload certificates, the control plane
running on its own loop in a thread, and a real Envoy bootstrapped over ADS to it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2

from tests.support.ports import free_port
from webhook.ca.authority import CertificateAuthority
from webhook.config import Ports
from webhook.dataplane.ads_bootstrap import XdsOptions, render_ads_bootstrap
from webhook.dataplane.bootstrap import BootstrapOptions, render_sds
from webhook.dataplane.identity import build_csr, key_pem, new_key
from webhook.discovery.ads import serve_ads, server_credentials
from webhook.discovery.conn import ProxyConn
from webhook.discovery.core import Discovery, DiscoverySettings
from webhook.discovery.run import new_event_loop, xds_certificate
from webhook.discovery.store import ObjectStore
from webhook.telemetry.workload import proxy_environment

__all__ = [
    "ControlPlane",
    "Envoy",
    "delta_request",
    "drain",
    "free_ports",
    "make_ca",
    "run_control_plane",
    "run_envoy",
    "sidecar_env",
    "workload_cert",
]


def free_ports() -> Ports:
    """Proxy ports nobody else on this machine uses (Envoy runs in the root namespace here)."""
    ports: list[int] = []
    while len(ports) < 6:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return Ports(*ports)


def make_ca(directory: Path) -> CertificateAuthority:
    ca = CertificateAuthority.create(now=datetime.now(UTC))
    ca.save(directory)
    return ca


def workload_cert(ca: CertificateAuthority, spiffe_id: str, directory: Path) -> Path:
    """cert.pem, key.pem and ca.crt for ``spiffe_id`` in ``directory`` (the agent's layout)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = new_key()
    pem = ca.sign_workload(
        build_csr(key, spiffe_id), spiffe_id, now=datetime.now(UTC), ttl=timedelta(hours=1)
    )
    (directory / "cert.pem").write_text(pem)
    (directory / "key.pem").write_bytes(key_pem(key))
    (directory / "ca.crt").write_text(ca.root_pem)
    return directory


@dataclass
class ControlPlane:
    store: ObjectStore
    discovery: Discovery
    loop: asyncio.AbstractEventLoop
    address: str

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 10) -> Any:
        """Run ``fn(*args)`` on the control plane's loop (its state lives there)."""

        async def go() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(go(), self.loop).result(timeout=timeout)


@contextmanager
def run_control_plane(
    store: ObjectStore,
    settings: DiscoverySettings,
    cert_dir: Path,
    start_timeout: float = 20,
    credentials: Callable[[], Any] | None = None,
) -> Iterator[ControlPlane]:
    """``credentials``: makes the ADS server's TLS (default: a certificate issued in memory
    from the CA in ``cert_dir``)."""
    loop = new_event_loop()  # the loop the control plane runs on
    ready = threading.Event()
    stop = asyncio.Event()
    holder: dict[str, Any] = {}
    port = free_port()

    async def main() -> None:
        d = Discovery(store, settings)
        d.start(asyncio.get_running_loop())
        if credentials is None:
            creds = server_credentials(*xds_certificate(cert_dir, settings.trust_domain))
        else:
            creds = credentials()
        server = await serve_ads(d, f"127.0.0.1:{port}", creds)
        holder["d"] = d
        ready.set()
        await stop.wait()
        await server.stop(grace=0.5)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    if not ready.wait(start_timeout):
        raise RuntimeError("control plane did not start")
    try:
        yield ControlPlane(store, holder["d"], loop, f"127.0.0.1:{port}")
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)


@dataclass
class Envoy:
    proc: subprocess.Popen[bytes]
    admin: int
    log: Path

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def config_dump(self) -> dict[str, Any]:
        code, body = self.get("/config_dump?include_eds")
        assert code == 200, body
        return dict(json.loads(body))

    def wait(self, check: Callable[[], bool], what: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"envoy exited: {self.log.read_text()[-3000:]}")
            try:
                if check():
                    return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}: {self.log.read_text()[-3000:]}")


def sidecar_env(opts: BootstrapOptions, labels: Mapping[str, str] | None = None) -> dict[str, str]:
    """Envoy's environment as the agent starts it: who the sidecar is (``labels``: the pod's),
    which the telemetry in its listeners reads. For every test that starts Envoy itself."""
    own = proxy_environment(opts.pod_name, opts.pod_namespace, opts.spiffe_id, labels or {})
    return {**os.environ, **own}


@contextmanager
def run_envoy(
    binary: str,
    opts: BootstrapOptions,
    xds: XdsOptions,
    work: Path,
    *,
    node_id: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> Iterator[Envoy]:
    """A real Envoy with the ADS bootstrap of ``opts`` (its cert_dir must hold a workload cert),
    in the environment the agent would give it (``labels``: the pod's)."""
    opts = replace(opts, work_dir=str(work))
    (work / "sds").mkdir(parents=True, exist_ok=True)
    for name, content in render_sds(opts).items():
        (work / "sds" / name).write_text(json.dumps(content))
    boot = render_ads_bootstrap(opts, xds)
    if node_id is not None:
        boot["node"]["id"] = node_id
    path = work / "envoy.json"
    path.write_text(json.dumps(boot))
    log = work / "envoy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                "-c",
                str(path),
                "--disable-hot-restart",
                "--log-level",
                "warning",
                "--concurrency",
                "1",
                "--base-id",
                str(opts.ports.admin),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=sidecar_env(opts, labels),
        )
    envoy = Envoy(proc, opts.ports.admin, log)
    try:
        yield envoy
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def drain(conn: ProxyConn) -> list[discovery_pb2.DeltaDiscoveryResponse]:
    """Every response queued for ``conn`` so far (the push engine without a network)."""
    out = []
    while not conn.queue.empty():
        item = conn.queue.get_nowait()
        assert item is not None
        out.append(discovery_pb2.DeltaDiscoveryResponse.FromString(item))
    return out


def delta_request(type_url: str, *names: str, nonce: str = "") -> Any:
    """A DeltaDiscoveryRequest as a sidecar sends it: subscribe ``names``, ACK ``nonce``."""
    return discovery_pb2.DeltaDiscoveryRequest(
        type_url=type_url, resource_names_subscribe=list(names), response_nonce=nonce
    )
