"""The sidecar agent's parts: identity checks, the atomic certificate directory, settings, probes.

The agent as a whole (CA over HTTPS, Envoy as uid 1337, renewal, drain) runs for real in
``tests/test_agent_netns.py`` and in the end-to-end test.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from webhook.ca.authority import CertificateAuthority
from webhook.dataplane.agent import _write_config, api_server_destinations, settings_from
from webhook.dataplane.identity import (
    CARequestError,
    build_csr,
    check_issued,
    install_generation,
    new_key,
    renewal_time,
)
from webhook.dataplane.probes import parse_probes, run_probe
from webhook.errors import ConfigError

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
SPIFFE = "spiffe://cluster.local/ns/shop/sa/cart"


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(now=NOW)


def _issue(ca: CertificateAuthority, key: Any, spiffe: str = SPIFFE, ttl: int = 30) -> str:
    return ca.sign_workload(build_csr(key, spiffe), spiffe, now=NOW, ttl=timedelta(seconds=ttl))


def test_issued_certificate_is_checked_against_our_key_and_identity(
    ca: CertificateAuthority,
) -> None:
    key = new_key()
    issued = check_issued(key, _issue(ca, key), ca.root_pem, SPIFFE)
    assert issued.spiffe_id == SPIFFE
    assert issued.not_after - NOW == timedelta(seconds=30)
    with pytest.raises(CARequestError, match="different key"):
        check_issued(new_key(), _issue(ca, key), ca.root_pem, SPIFFE)
    with pytest.raises(CARequestError, match="this pod is"):
        check_issued(key, _issue(ca, key, "spiffe://cluster.local/ns/x/sa/y"), ca.root_pem, SPIFFE)
    with pytest.raises(CARequestError, match="not PEM"):
        check_issued(key, "garbage", ca.root_pem, SPIFFE)


def test_renewal_at_half_of_the_lifetime_we_actually_got(ca: CertificateAuthority) -> None:
    key = new_key()
    issued = check_issued(key, _issue(ca, key, ttl=30), ca.root_pem, SPIFFE)
    # The CA back-dates notBefore by minutes (clock skew); half of notBefore..notAfter would
    # already be in the past and the agent would renew in a loop.
    assert issued.not_before < NOW - timedelta(minutes=1)
    assert renewal_time(issued, NOW) == NOW + timedelta(seconds=15)


def test_generation_swap_is_atomic_and_keeps_only_the_current(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    certs = tmp_path / "certs"
    key1 = new_key()
    gen1 = install_generation(
        certs, key1, check_issued(key1, _issue(ca, key1), ca.root_pem, SPIFFE)
    )
    assert (certs / "..data").readlink() == Path(gen1.name)
    assert stat.S_IMODE((certs / "key.pem").stat().st_mode) == 0o600
    first = (certs / "cert.pem").read_text()
    key2 = new_key()
    gen2 = install_generation(
        certs, key2, check_issued(key2, _issue(ca, key2), ca.root_pem, SPIFFE)
    )
    assert gen2 != gen1 and not gen1.exists()
    assert (certs / "cert.pem").read_text() != first
    # The stable names Envoy reads now resolve to the new pair, which belong together.
    leaf = x509.load_pem_x509_certificate((certs / "cert.pem").read_bytes())
    assert leaf.public_key() == key2.public_key()
    assert (certs / "ca.crt").read_text() == ca.root_pem
    assert sorted(p.name for p in certs.iterdir()) == sorted(
        ["..data", gen2.name, "ca.crt", "cert.pem", "key.pem"]
    )


FLAGS = {
    "ca_address": "https://ca:8443",
    "token_file": "/t",
    "bundle_file": "/b",
    "cert_dir": "/c",
    "work_dir": "/w",
    "envoy_binary": "envoy",
    "log_level": "warning",
    "concurrency": 1,
}
ENV = {"POD_NAME": "cart-1", "POD_NAMESPACE": "shop", "SERVICE_ACCOUNT": "cart"}


def test_settings_come_from_flags_and_downward_api() -> None:
    env = {
        **ENV,
        "POD_IP": "10.1.2.3",
        "SIDEMESH_INBOUND_MTLS": "STRICT",
        "SIDEMESH_MESH_CIDRS": "10.0.0.0/8,fd00::/8",
        "SIDEMESH_CERT_TTL_SECONDS": "600",
        "SIDEMESH_APP_PROBES": json.dumps({"/app-health/a/readyz": {"tcpSocket": {"port": 80}}}),
    }
    s = settings_from(FLAGS, env)
    assert s.spiffe_id == SPIFFE and s.pod_ip == "10.1.2.3" and s.inbound_mtls == "STRICT"
    assert s.mesh_cidrs == ("10.0.0.0/8", "fd00::/8") and s.cert_ttl_seconds == 600
    assert set(s.app_probes) == {"/app-health/a/readyz"}


def test_api_server_and_plaintext_ports_reach_the_bootstrap() -> None:
    """The kubelet's KUBERNETES_SERVICE_* of the sidecar itself, and the injected
    SIDEMESH_PLAINTEXT_PORTS, end up in the bootstrap options; defaults without them."""
    env = {
        **ENV,
        "KUBERNETES_SERVICE_HOST": "10.96.0.1",
        "KUBERNETES_SERVICE_PORT": "443",
        "KUBERNETES_SERVICE_PORT_HTTPS": "443",
        "SIDEMESH_PLAINTEXT_PORTS": "53,5432",
    }
    opts = settings_from(FLAGS, env).bootstrap_options()
    assert opts.api_servers == (("10.96.0.1", 443),)
    assert opts.plaintext_ports == (53, 5432)
    plain = settings_from(FLAGS, ENV).bootstrap_options()
    assert plain.api_servers == () and plain.plaintext_ports == (53,)
    none = settings_from(FLAGS, {**ENV, "SIDEMESH_PLAINTEXT_PORTS": ""})
    assert none.plaintext_ports == ()


def test_discovery_address_selects_the_ads_bootstrap_and_empty_the_static_one(
    tmp_path: Path,
) -> None:
    flags = {**FLAGS, "work_dir": str(tmp_path), "cert_dir": str(tmp_path / "certs")}
    env = {**ENV, "SIDEMESH_DISCOVERY_ADDRESS": "sidemesh-discovery.sidemesh-system.svc:15012"}
    ads = json.loads(_write_config(settings_from(flags, env), None).read_text())
    assert ads["dynamic_resources"]["ads_config"]["api_type"] == "DELTA_GRPC"
    assert ads["dynamic_resources"]["lds_config"]["initial_fetch_timeout"] == "10s"
    assert {x["name"] for x in ads["static_resources"]["listeners"]} == {"health", "stats"}
    static = json.loads(_write_config(settings_from(flags, ENV), None).read_text())
    assert "dynamic_resources" not in static
    assert "outbound" in {x["name"] for x in static["static_resources"]["listeners"]}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"KUBERNETES_SERVICE_HOST": "fd00:10:96::1", "KUBERNETES_SERVICE_PORT": "443"},
         (("fd00:10:96::1", 443),)),
        ({"KUBERNETES_SERVICE_HOST": "[fd00:10:96::1]", "KUBERNETES_SERVICE_PORT": "443"},
         (("fd00:10:96::1", 443),)),
        ({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "6443",
          "KUBERNETES_SERVICE_PORT_HTTPS": "443"}, (("10.96.0.1", 6443), ("10.96.0.1", 443))),
        # Overridden with a host name, or a bad port: no exemption, but the pod still starts.
        ({"KUBERNETES_SERVICE_HOST": "api.example", "KUBERNETES_SERVICE_PORT": "443"}, ()),
        ({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "https"}, ()),
        ({"KUBERNETES_SERVICE_PORT": "443"}, ()),
    ],
)  # fmt: skip
def test_api_server_destinations_from_the_kubelet_env(
    env: dict[str, str], expected: tuple[tuple[str, int], ...]
) -> None:
    assert api_server_destinations(env) == expected


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"POD_NAMESPACE": "shop"}, "POD_NAME"),
        ({**ENV, "SIDEMESH_PLAINTEXT_PORTS": "53,dns"}, "SIDEMESH_PLAINTEXT_PORTS"),
        ({**ENV, "SIDEMESH_INBOUND_MTLS": "LOOSE"}, "SIDEMESH_INBOUND_MTLS"),
        ({**ENV, "SIDEMESH_MESH_CIDRS": "10.1.2.3/8"}, "SIDEMESH_MESH_CIDRS"),
        ({**ENV, "SIDEMESH_APP_PROBES": "{not json"}, "SIDEMESH_APP_PROBES"),
        ({**ENV, "SIDEMESH_APP_PROBES": '{"/x": {"exec": {}}}'}, "SIDEMESH_APP_PROBES"),
        ({**ENV, "SIDEMESH_CERT_TTL_SECONDS": "1h"}, "SIDEMESH_CERT_TTL_SECONDS"),
        ({**ENV, "SIDEMESH_DISCOVERY_ADDRESS": "cp"}, "SIDEMESH_DISCOVERY_ADDRESS"),
    ],
)
def test_bad_environment_names_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises((ConfigError, ValueError), match=message):
        settings_from(FLAGS, env)


class _App(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        code = {"/ok": 200, "/redirect": 302, "/broken": 500}.get(self.path, 404)
        seen = self.headers.get("X-Probe", "")
        self.send_response(code)
        self.send_header("Content-Length", str(len(seen)))
        self.end_headers()
        self.wfile.write(seen.encode())

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def app_port() -> Any:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _App)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_probes_run_the_original_check_against_the_app(app_port: int) -> None:
    def http(path: str) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": app_port, "scheme": "HTTP"}, "timeoutSeconds": 1}

    assert run_probe(http("/ok"), "127.0.0.1")[0] == 200
    assert run_probe(http("/redirect"), "127.0.0.1")[0] == 200  # 3xx passes, as for a kubelet
    assert run_probe(http("/broken"), "127.0.0.1")[0] == 500
    assert run_probe({"tcpSocket": {"port": app_port}}, "127.0.0.1")[0] == 200
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    status, why = run_probe({"tcpSocket": {"port": closed}, "timeoutSeconds": 1}, "127.0.0.1")
    assert status == 503 and "unreachable" in why
    assert (
        run_probe(http("/ok") | {"httpGet": {"port": closed, "path": "/"}}, "127.0.0.1")[0] == 503
    )


def test_probe_headers_are_sent(app_port: int) -> None:
    probe = {
        "httpGet": {
            "path": "/ok",
            "port": app_port,
            "httpHeaders": [{"name": "X-Probe", "value": "from-kubelet"}],
        }
    }
    assert run_probe(probe, "127.0.0.1") == (200, "app answered 200")


def test_parse_probes_accepts_the_injector_format() -> None:
    raw = json.dumps(
        {
            "/app-health/web/livez": {"httpGet": {"path": "/", "port": 8080, "scheme": "HTTP"}},
            "/app-health/web/startupz": {"grpc": {"port": 9000, "service": "x"}},
        }
    )
    assert set(parse_probes(raw)) == {"/app-health/web/livez", "/app-health/web/startupz"}
    assert parse_probes("") == {}


def test_proxy_wait_times_out_with_a_message() -> None:
    url = "http://127.0.0.1:9/healthz/ready"  # the discard port: nothing answers
    done = subprocess.run(
        [sys.executable, "-m", "webhook", "proxy", "wait", "--timeout", "0.3", "--url", url],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert "not ready after 0.3s" in done.stderr
