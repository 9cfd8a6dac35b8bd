"""The mesh config (webhook/config.py) and the shared value parsers (webhook/values.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from webhook.config import RESERVED_PORTS, MeshConfig, load_config, load_config_file
from webhook.errors import ConfigError
from webhook.values import parse_bool, parse_cidr_list, parse_port, parse_port_list, parse_quantity


def test_defaults_are_the_documented_ones() -> None:
    cfg = MeshConfig()
    assert (cfg.proxy.uid, cfg.proxy.gid) == (1337, 1337)
    assert cfg.ports.all() == (15000, 15001, 15006, 15020, 15021, 15090) == RESERVED_PORTS
    assert cfg.ports.never_captured_inbound() == (15020, 15021, 15090)
    assert cfg.trust_domain == "cluster.local" and cfg.inbound_mtls == "PERMISSIVE"
    assert cfg.proxy.native_sidecar and cfg.rewrite_probes
    assert "kube-system" in cfg.ignored_namespaces and "sidemesh-system" in cfg.ignored_namespaces
    assert load_config(None) == cfg == load_config({})
    assert cfg.discovery_address == "sidemesh-discovery.sidemesh-system.svc:15012"
    # Empty: no control plane, the static bootstrap; IPv6 hosts in brackets.
    assert load_config({"discovery_address": ""}).discovery_address == ""
    assert load_config({"discovery_address": "[fd00::1]:15012"}).discovery_address
    with pytest.raises(AttributeError):
        cfg.trust_domain = "x"  # type: ignore[misc]


def test_a_file_overrides_nested_keys(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(
        "trust_domain: prod.example\n"
        "mesh_cidrs: [10.0.0.0/8, 'fd00::/8']\n"
        "plaintext_ports: [53, 5432]\n"
        "proxy:\n  image: registry.example/sm:2\n  native_sidecar: false\n  cpu_limit: ''\n"
        "ports:\n  stats: 19090\n"
    )
    cfg = load_config_file(path)
    assert cfg.trust_domain == "prod.example"
    assert cfg.mesh_cidrs == ("10.0.0.0/8", "fd00::/8")
    assert cfg.plaintext_ports == (53, 5432) and MeshConfig().plaintext_ports == (53,)
    assert cfg.proxy.image == "registry.example/sm:2" and not cfg.proxy.native_sidecar
    assert cfg.proxy.cpu_limit == "" and cfg.proxy.memory_limit == "1Gi"
    assert cfg.ports.stats == 19090 and cfg.ports.health == 15021
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config_file(empty) == MeshConfig()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"trust_domian": "x"}, "unknown config key 'trust_domian'"),
        ({"proxy": {"imagee": "x"}}, "unknown config key 'proxy.imagee'"),
        ({"proxy": "x"}, "'proxy' has bad value 'x': expected a mapping"),
        ({"proxy": {"uid": "1337"}}, "'proxy.uid' has bad value '1337': expected an integer"),
        ({"proxy": {"uid": True}}, "expected an integer"),
        ({"proxy": {"uid": 0}}, "'proxy.uid' has bad value 0"),
        ({"proxy": {"native_sidecar": "yes"}}, "expected true or false"),
        ({"proxy": {"image": ""}}, "'proxy.image' has bad value ''"),
        ({"proxy": {"init_image": "a b"}}, "'proxy.init_image' has bad value 'a b'"),
        ({"proxy": {"cpu_request": "lots"}}, "'proxy.cpu_request' has bad value 'lots'"),
        ({"proxy": {"memory_request": ""}}, "'proxy.memory_request' has bad value ''"),
        ({"proxy": {"log_level": "loud"}}, "expected one of trace, debug"),
        ({"proxy": {"concurrency": 0}}, "'proxy.concurrency'"),
        ({"proxy": {"cert_ttl_seconds": 30 * 86400}}, "outside the CA's TTL range"),
        ({"inbound_mtls": "strict"}, "expected one of PERMISSIVE, STRICT"),
        ({"trust_domain": "Cluster.Local"}, "'trust_domain'"),
        ({"trust_domain": "a/b"}, "'trust_domain'"),
        ({"ca_address": "http://ca"}, "must be an https:// URL"),
        ({"discovery_address": "https://cp:15012"}, "'discovery_address' has bad value"),
        ({"discovery_address": "cp"}, "expected host:port"),
        ({"discovery_address": "cp:0"}, "expected host:port"),
        ({"discovery_address": "fd00::1:15012"}, "expected host:port"),
        ({"mesh_cidrs": "10.0.0.0/8"}, "expected a list"),
        ({"mesh_cidrs": ["10.0.0.1/8"]}, "'mesh_cidrs' has bad value '10.0.0.1/8'"),
        ({"plaintext_ports": [0]}, "'plaintext_ports' has bad value 0"),
        ({"plaintext_ports": ["53"]}, "'plaintext_ports' has bad value '53': expected an integer"),
        ({"ports": {"stats": 70000}}, "'ports.stats' has bad value 70000"),
        ({"ports": {"stats": 15021}}, "the proxy's ports must be distinct"),
        ({"ca": {"min_ttl_seconds": 0}}, "'ca.default_ttl_seconds'"),
        ({"webhook": {"max_body_bytes": 10}}, "at least 1024"),
    ],
)
def test_bad_config_names_the_key_and_the_value(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(data)
    assert message in str(info.value)


def test_config_file_errors_say_which_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("proxy: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config_file(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config_file(listed)


@pytest.mark.parametrize(
    ("raw", "value"),
    [("true", True), ("Yes", True), ("1", True), ("enabled", True), (" off ", False),
     ("disabled", False)],
)  # fmt: skip
def test_parse_bool(raw: str, value: bool) -> None:
    assert parse_bool(raw) is value


@pytest.mark.parametrize("raw", ["", "maybe", "2", "truee"])
def test_parse_bool_refuses(raw: str) -> None:
    with pytest.raises(ValueError, match="expected true or false"):
        parse_bool(raw)


def test_ports_and_port_lists() -> None:
    assert parse_port(" 8080 ") == 8080
    assert parse_port_list("80, 443,80") == (80, 443)
    assert parse_port_list("8000-8002,8001") == (8000, 8001, 8002)
    assert parse_port_list("*", allow_all=True) == "*"
    assert parse_port_list("") == ()
    for bad in ("0", "65536", "http", "-1", "²", "８０", "1.5"):
        with pytest.raises(ValueError):
            parse_port(bad)
    for bad in ("80,", "*", "9-1", "1-2000", "80,,81"):
        with pytest.raises(ValueError):
            parse_port_list(bad)


def test_cidr_lists_are_normalised() -> None:
    assert parse_cidr_list("10.0.0.0/8, 192.168.1.1,10.0.0.0/8") == ("10.0.0.0/8", "192.168.1.1/32")
    assert parse_cidr_list("FD00::/8") == ("fd00::/8",)
    assert parse_cidr_list("*", allow_all=True) == "*"
    for bad in ("10.0.0.1/8", "10.0.0.0/33", "nope", "10.0.0.0/8,", "*"):
        with pytest.raises(ValueError):
            parse_cidr_list(bad)


@pytest.mark.parametrize("raw", ["100m", "1", "0.5", ".5", "1.5Gi", "128Mi", "1e3", "2E-2", "+1"])
def test_quantities(raw: str) -> None:
    assert parse_quantity(raw) == raw


@pytest.mark.parametrize("raw", ["", "lots", "1 Gi", "1GB", "-1", "１００m", "1e", "Mi"])
def test_bad_quantities(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_quantity(raw)
