"""One source per fact: the mesh defaults live in ``webhook.config``, the SPIFFE id format in
``webhook.names``; every other role derives from them instead of repeating the literals."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from webhook import names
from webhook.cli import proxy as proxy_cli, traffic as traffic_cli
from webhook.config import DEFAULTS, MeshConfig, load_config
from webhook.dataplane.agent import AgentSettings, settings_from
from webhook.dataplane.bootstrap import BootstrapOptions, render_bootstrap
from webhook.dataplane.capture import CaptureOptions
from webhook.errors import ConfigError

WEBHOOK = Path(__file__).resolve().parent.parent / "webhook"


def _defaults(cls: type[Any]) -> dict[str, Any]:
    fields = dataclasses.fields(cls)
    return {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}


def test_the_defaults_are_the_mesh_configs() -> None:
    assert DEFAULTS == MeshConfig() == load_config(None)
    mesh = {
        "trust_domain": DEFAULTS.trust_domain,
        "inbound_mtls": DEFAULTS.inbound_mtls,
        "mesh_cidrs": DEFAULTS.mesh_cidrs,
        "plaintext_ports": DEFAULTS.plaintext_ports,
    }
    assert mesh.items() <= _defaults(BootstrapOptions).items()
    proxy = {
        "log_level": DEFAULTS.proxy.log_level,
        "concurrency": DEFAULTS.proxy.concurrency,
        "proxy_uid": DEFAULTS.proxy.uid,
        "proxy_gid": DEFAULTS.proxy.gid,
    }
    assert {**mesh, **proxy}.items() <= _defaults(AgentSettings).items()
    capture = CaptureOptions()
    assert (capture.proxy_uid, capture.proxy_gid) == (DEFAULTS.proxy.uid, DEFAULTS.proxy.gid)
    assert (capture.inbound_port, capture.outbound_port) == (
        DEFAULTS.ports.inbound,
        DEFAULTS.ports.outbound,
    )


def test_an_agent_without_mesh_environment_gets_the_defaults() -> None:
    flags = {
        "ca_address": DEFAULTS.ca_address,
        "token_file": "/t",
        "bundle_file": "/b",
        "cert_dir": "/c",
        "work_dir": "/w",
        "envoy_binary": "envoy",
        "log_level": DEFAULTS.proxy.log_level,
        "concurrency": DEFAULTS.proxy.concurrency,
    }
    s = settings_from(flags, {"POD_NAME": "p", "POD_NAMESPACE": "shop"})
    assert (s.trust_domain, s.inbound_mtls) == (DEFAULTS.trust_domain, DEFAULTS.inbound_mtls)
    assert (s.mesh_cidrs, s.plaintext_ports) == (DEFAULTS.mesh_cidrs, DEFAULTS.plaintext_ports)
    assert s.service_account == names.DEFAULT_SERVICE_ACCOUNT


def _flag_defaults(register: Any, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(argv)


def test_cli_flag_defaults_are_the_mesh_configs() -> None:
    proxy = _flag_defaults(proxy_cli.register, ["proxy"])
    assert proxy.ca_address == DEFAULTS.ca_address
    assert (proxy.log_level, proxy.concurrency) == (
        DEFAULTS.proxy.log_level,
        DEFAULTS.proxy.concurrency,
    )
    traffic = _flag_defaults(traffic_cli.register, ["init-traffic"])
    assert (traffic.proxy_uid, traffic.inbound_port) == (DEFAULTS.proxy.uid, DEFAULTS.ports.inbound)


# Literals that are mesh defaults or the SPIFFE format: written once, in config.py / names.py.
_OWNED = {"cluster.local": "config.py", "10.0.0.0/8": "config.py", 1337: "config.py"}
_SPIFFE = "spiffe://"
#: Files that still build or take apart SPIFFE ids themselves; each should call webhook.names
#: instead (discovery's model must not fail on one bad object, so it needs a non-raising form).
_SPIFFE_LEFT = {
    "ca/tokens.py",
    "discovery/build.py",
    "discovery/ads.py",
    "discovery/servingcert.py",
}


def _constants(path: Path) -> list[tuple[int, object]]:
    return [
        (node.lineno, node.value)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and isinstance(node.value, str | int)
    ]


def test_no_module_repeats_a_default_or_the_spiffe_format() -> None:
    found = []
    for path in sorted(WEBHOOK.rglob("*.py")):
        rel = path.relative_to(WEBHOOK).as_posix()
        for line, value in _constants(path):
            owner = _OWNED.get(value) if not isinstance(value, bool) else None
            if owner is not None and rel != owner:
                found.append(f"{rel}:{line}: {value!r} (belongs to {owner})")
            elif (
                isinstance(value, str)
                and value.startswith(_SPIFFE)
                and rel not in {"names.py", *_SPIFFE_LEFT}
            ):
                found.append(f"{rel}:{line}: {value!r} (use webhook.names.spiffe_id)")
    assert not found, "\n".join(found)


# --- SPIFFE ids ---------------------------------------------------------------------------------


def test_spiffe_ids_round_trip() -> None:
    sid = names.spiffe_id("cluster.local", "shop", "cart.v2")
    assert sid == "spiffe://cluster.local/ns/shop/sa/cart.v2"
    assert names.parse_spiffe_id(sid) == ("cluster.local", "shop", "cart.v2")
    assert sid.startswith(names.trust_domain_prefix("cluster.local"))


@pytest.mark.parametrize(
    ("parts", "named"),
    [
        (("Cluster.Local", "shop", "cart"), "'Cluster.Local' is not a trust domain"),
        (("a/b", "shop", "cart"), "'a/b' is not a trust domain"),
        (("td", "Shop", "cart"), "'Shop' is not a Kubernetes namespace name"),
        (("td", "a/b", "cart"), "'a/b' is not a Kubernetes namespace name"),
        (("td", "shop", ".."), "'..' is not a Kubernetes service account name"),
        (("td", "shop", "a..b"), "'a..b' is not a Kubernetes service account name"),
        (("td", "shop", ""), "'' is not a Kubernetes service account name"),
        (("td", "shop\n", "cart"), "'shop\\n' is not a Kubernetes namespace name"),
        (("td", "shop", "cart\n"), "'cart\\n' is not a Kubernetes service account name"),
        (("td\n", "shop", "cart"), "'td\\n' is not a trust domain"),
    ],
)
def test_a_bad_part_is_named(parts: tuple[str, str, str], named: str) -> None:
    with pytest.raises(ValueError, match=re.escape(named)):
        names.spiffe_id(*parts)


def test_the_bootstrap_validates_the_id_it_writes() -> None:
    ok = BootstrapOptions(pod_name="p", pod_namespace="shop", service_account="cart")
    assert render_bootstrap(ok)["node"]["metadata"]["spiffe_id"] == (
        "spiffe://cluster.local/ns/shop/sa/cart"
    )
    bad = dataclasses.replace(ok, service_account="../admin")
    with pytest.raises(ValueError, match="service account name"):
        render_bootstrap(bad)


def test_the_agent_refuses_an_environment_that_gives_no_spiffe_id() -> None:
    flags = {
        "ca_address": DEFAULTS.ca_address,
        "token_file": "/t",
        "bundle_file": "/b",
        "cert_dir": "/c",
        "work_dir": "/w",
        "envoy_binary": "envoy",
        "log_level": "info",
        "concurrency": 1,
    }
    env = {"POD_NAME": "p", "POD_NAMESPACE": "shop", names.ENV_TRUST_DOMAIN: "Bad/Domain"}
    with pytest.raises(ConfigError, match=r"SIDEMESH_TRUST_DOMAIN.*'Bad/Domain' is not a trust"):
        settings_from(flags, env)


# --- one port/CIDR rule for config keys, annotations and init-traffic flags --------------------


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("mesh_cidrs", ["10.1.2.3/8"], "'10.1.2.3/8' is not a CIDR (10.1.2.3/8 has host bits set)"),
        ("plaintext_ports", [70000], "port 70000 is outside 1-65535"),
        ("ports", {"stats": 0}, "port 0 is outside 1-65535"),
    ],
)
def test_config_keys_follow_the_shared_rules(key: str, value: Any, why: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config({key: value})
    assert str(refused.value).endswith(f": {why}")
