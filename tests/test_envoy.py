"""The Envoy bootstrap: golden files per option set, each one accepted by the real Envoy.

``make golden`` (UPDATE_GOLDEN=1) rewrites ``tests/testdata/envoy/*.json``; a golden file that
no case produces any more fails :func:`test_no_stale_goldens`.
"""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import TESTDATA, UPDATE_GOLDEN, envoy_binary
from webhook.dataplane.bootstrap import BootstrapOptions, render_bootstrap, render_sds

GOLDEN_DIR = TESTDATA / "envoy"

CASES: dict[str, BootstrapOptions] = {
    "permissive-default": BootstrapOptions(
        pod_name="cart-7d9f-abcde", pod_namespace="shop", service_account="cart"
    ),
    "strict-dual-stack-cidrs": BootstrapOptions(
        pod_name="db-0",
        pod_namespace="data",
        service_account="postgres",
        inbound_mtls="STRICT",
        mesh_cidrs=("10.0.0.0/8", "192.168.0.0/16", "fd00::/8"),
        ipv6=True,
    ),
    "ipv6-only": BootstrapOptions(
        pod_name="web-2",
        pod_namespace="v6",
        service_account="web",
        mesh_cidrs=("fd00:10::/48",),
        ipv4=False,
        ipv6=True,
    ),
    "custom-trust-domain": BootstrapOptions(
        pod_name="api-1",
        pod_namespace="payments",
        service_account="api",
        trust_domain="corp.example",
        mesh_cidrs=("172.16.0.0/12",),
        sniff_timeout_ms=250,
    ),
    # The kubelet's KUBERNETES_SERVICE_HOST/_PORT (and _PORT_HTTPS), IPv4 and IPv6, plus the
    # mesh config's always-plaintext ports: exact-address chains ahead of the mesh CIDRs.
    "apiserver-plaintext-dual-stack": BootstrapOptions(
        pod_name="operator-5c6d-xyz12",
        pod_namespace="ops",
        service_account="operator",
        mesh_cidrs=("10.0.0.0/8", "fd00::/8"),
        ipv6=True,
        plaintext_ports=(53, 5432, 15090),
        api_servers=(("10.96.0.1", 443), ("fd00:10:96::1", 443), ("10.96.0.1", 6443)),
    ),
}


def _rendered(opts: BootstrapOptions) -> dict[str, object]:
    return {"bootstrap": render_bootstrap(opts), "sds": render_sds(opts)}


@pytest.mark.golden
@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_bootstrap(case: str) -> None:
    path = GOLDEN_DIR / f"{case}.json"
    text = json.dumps(_rendered(CASES[case]), indent=2, sort_keys=True) + "\n"
    if UPDATE_GOLDEN:
        GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden {path}; run make golden"
    assert path.read_text() == text, f"{path.name} differs; review, then make golden"


@pytest.mark.golden
def test_no_stale_goldens() -> None:
    stale = sorted(p.name for p in GOLDEN_DIR.glob("*.json") if p.stem not in CASES)
    assert not stale, f"golden files no case produces: {stale}"


def _self_signed(cert_dir: Path, spiffe_id: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "golden")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), True
        )
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (cert_dir / "cert.pem").write_bytes(pem)
    (cert_dir / "ca.crt").write_bytes(pem)
    (cert_dir / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.mark.golden
@pytest.mark.envoy
@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_is_valid_for_envoy(case: str, tmp_path: Path) -> None:
    """The same options, rendered with paths that exist here, pass ``envoy --mode validate``."""
    binary = envoy_binary()
    opts = CASES[case]
    cert_dir, work_dir = tmp_path / "certs", tmp_path / "work"
    (work_dir / "sds").mkdir(parents=True)
    cert_dir.mkdir()
    local = BootstrapOptions(
        **{**opts.__dict__, "cert_dir": str(cert_dir), "work_dir": str(work_dir)}
    )
    _self_signed(cert_dir, local.spiffe_id)
    for name, content in render_sds(local).items():
        (work_dir / "sds" / name).write_text(json.dumps(content))
    bootstrap = work_dir / "envoy.json"
    bootstrap.write_text(json.dumps(render_bootstrap(local)))
    done = subprocess.run(
        [binary, "--mode", "validate", "-c", str(bootstrap), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout + done.stderr


def _chains(listener: dict[str, object]) -> dict[str, dict[str, object]]:
    return {c["name"]: c for c in listener["filter_chains"]}  # type: ignore[attr-defined]


def _listener(opts: BootstrapOptions, name: str) -> dict[str, object]:
    listeners = render_bootstrap(opts)["static_resources"]["listeners"]
    return next(lst for lst in listeners if lst["name"] == name)


def test_strict_has_no_plaintext_chain_and_permissive_has() -> None:
    strict = _chains(_listener(CASES["strict-dual-stack-cidrs"], "inbound"))
    permissive = _chains(_listener(CASES["permissive-default"], "inbound"))
    assert set(strict) == {"inbound-mtls-http", "inbound-mtls-h2", "inbound-mtls-tcp"}
    assert {"inbound-plain-http", "inbound-plain-tcp"} <= set(permissive)


def test_each_sniffed_protocol_reaches_a_codec_that_speaks_it() -> None:
    """What the outbound side sniffs, the ALPN its cluster announces, and the codec of the
    inbound chain that ALPN selects must agree: h2c parsed as HTTP/1 is a protocol error."""
    boot = render_bootstrap(CASES["permissive-default"])
    clusters = {c["name"]: c for c in boot["static_resources"]["clusters"]}
    outbound = _chains(_listener(CASES["permissive-default"], "outbound"))
    inbound = _chains(_listener(CASES["permissive-default"], "inbound"))
    by_alpn = {
        tuple(c["filter_chain_match"].get("application_protocols", [])): c  # type: ignore[attr-defined]
        for c in inbound.values()
        if c["filter_chain_match"].get("transport_protocol") == "tls"  # type: ignore[attr-defined]
    }
    seen = {}
    for chain in outbound.values():
        match = chain["filter_chain_match"]
        if "prefix_ranges" not in match or "destination_port" in match:  # type: ignore[operator]
            continue
        cluster = clusters[chain["filters"][0]["typed_config"]["cluster"]]  # type: ignore[index]
        tls = cluster.get("transport_socket")
        if tls is None:
            continue
        (alpn,) = tls["typed_config"]["common_tls_context"]["alpn_protocols"]
        target = by_alpn.get((alpn,)) or by_alpn[()]
        hcm = target["filters"][0]["typed_config"]  # type: ignore[index]
        codec = hcm.get("codec_type", "TCP")
        for sniffed in match.get("application_protocols", ["other"]):  # type: ignore[attr-defined]
            seen[sniffed] = (alpn, codec)
    assert seen == {
        "h2c": ("sidemesh-h2", "HTTP2"),
        "http/1.1": ("sidemesh-http", "HTTP1"),
        "http/1.0": ("sidemesh-http", "HTTP1"),
        "other": ("sidemesh-tcp", "TCP"),
    }


def test_inbound_requires_client_cert_from_our_trust_domain() -> None:
    chain = _chains(_listener(CASES["custom-trust-domain"], "inbound"))["inbound-mtls-tcp"]
    tls = chain["transport_socket"]["typed_config"]  # type: ignore[index]
    assert tls["require_client_certificate"] is True
    ctx = tls["common_tls_context"]
    sans = ctx["combined_validation_context"]["default_validation_context"]
    assert sans["match_typed_subject_alt_names"][0]["matcher"] == {
        "prefix": "spiffe://corp.example/"
    }
    assert ctx["tls_params"]["tls_maximum_protocol_version"] == "TLSv1_3"


def test_admin_is_loopback_only_and_app_hop_comes_from_127_0_0_6() -> None:
    boot = render_bootstrap(CASES["permissive-default"])
    assert boot["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    app = next(c for c in boot["static_resources"]["clusters"] if c["name"] == "inbound_app")
    assert app["upstream_bind_config"]["source_address"]["address"] == "127.0.0.6"


def test_bad_cidr_and_bad_identity_are_refused() -> None:
    with pytest.raises(ValueError):
        render_bootstrap(
            BootstrapOptions(
                pod_name="p", pod_namespace="ns", service_account="sa", mesh_cidrs=("10.1.2.3/8",)
            )
        )
    with pytest.raises(ValueError):
        render_bootstrap(BootstrapOptions(pod_name="p", pod_namespace="a/b", service_account="sa"))
