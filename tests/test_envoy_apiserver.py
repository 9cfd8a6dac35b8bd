"""The outbound listener's plaintext exemptions inside the mesh CIDRs: the API server's
Service address(es) and the always-plaintext ports (DNS over TCP by default).

What these chains do with real traffic (the app's own TLS reaches a sidecar-less API server,
TCP :53 reaches a sidecar-less pod, meshed pods still get mTLS) is shown in
``tests/e2e/test_e2e_apiserver.py``; that Envoy accepts them, by the goldens in
``tests/test_envoy.py``.
"""

from __future__ import annotations

from typing import Any

import pytest

from webhook.dataplane.bootstrap import BootstrapOptions, render_bootstrap

BASE: dict[str, Any] = {"pod_name": "op-1", "pod_namespace": "ops", "service_account": "op"}


def _outbound_chains(opts: BootstrapOptions) -> list[dict[str, Any]]:
    listeners = render_bootstrap(opts)["static_resources"]["listeners"]
    outbound = next(lst for lst in listeners if lst["name"] == "outbound")
    chains: list[dict[str, Any]] = outbound["filter_chains"]
    return chains


def _cluster(chain: dict[str, Any]) -> str:
    return str(chain["filters"][0]["typed_config"]["cluster"])


def test_api_server_gets_an_exact_address_passthrough_chain_per_port() -> None:
    opts = BootstrapOptions(
        **BASE,
        mesh_cidrs=("10.0.0.0/8", "fd00::/8"),
        api_servers=(("10.96.0.1", 443), ("fd00:10:96:0:0::1", 443), ("10.96.0.1", 6443)),
    )
    chains = {c["name"]: c for c in _outbound_chains(opts)}
    https = chains["outbound-apiserver-443"]
    assert https["filter_chain_match"] == {
        "destination_port": 443,
        "prefix_ranges": [
            {"address_prefix": "10.96.0.1", "prefix_len": 32},
            # normalised, so the same address spelled two ways is one entry
            {"address_prefix": "fd00:10:96::1", "prefix_len": 128},
        ],
    }
    assert _cluster(https) == "passthrough" and "transport_socket" not in https
    assert chains["outbound-apiserver-6443"]["filter_chain_match"] == {
        "destination_port": 6443,
        "prefix_ranges": [{"address_prefix": "10.96.0.1", "prefix_len": 32}],
    }
    # Envoy prunes by port first: once a chain names :443, the port-less chains are out of the
    # race for every address on :443. So :443 carries its own copy of the mesh chains (other
    # meshed pods' :443 keep mTLS) and of the passthrough.
    for port in (443, 6443):
        assert chains[f"outbound-mesh-tcp-{port}"]["filter_chain_match"] == {
            "destination_port": port,
            "prefix_ranges": chains["outbound-mesh-tcp"]["filter_chain_match"]["prefix_ranges"],
        }
        assert _cluster(chains[f"outbound-mesh-http-{port}"]) == "outbound_mesh_http"
        assert chains[f"outbound-passthrough-{port}"]["filter_chain_match"] == {
            "destination_port": port
        }
    # The port-less mesh chains stay exactly as they were for every other port.
    assert _cluster(chains["outbound-mesh-tcp"]) == "outbound_mesh_tcp"
    assert "destination_port" not in chains["outbound-mesh-tcp"]["filter_chain_match"]


def test_api_server_on_a_port_plain_for_everyone_needs_no_chain_of_its_own() -> None:
    opts = BootstrapOptions(**BASE, api_servers=(("10.96.0.1", 53),))
    names = [c["name"] for c in _outbound_chains(opts)]
    assert "outbound-plain-53" in names
    assert not [n for n in names if n.endswith("-53") and n != "outbound-plain-53"]


def test_without_api_server_env_there_is_no_api_chain() -> None:
    names = [c["name"] for c in _outbound_chains(BootstrapOptions(**BASE))]
    assert not [n for n in names if "apiserver" in n]


def test_plaintext_ports_default_to_dns_and_merge_with_the_never_captured_ones() -> None:
    default = [c["name"] for c in _outbound_chains(BootstrapOptions(**BASE))]
    assert default[:4] == [
        "outbound-plain-15020",
        "outbound-plain-15021",
        "outbound-plain-15090",
        "outbound-plain-53",
    ]
    custom = _outbound_chains(BootstrapOptions(**BASE, plaintext_ports=(5432, 15090, 5432)))
    plain = [c for c in custom if c["name"].startswith("outbound-plain-")]
    assert [c["filter_chain_match"] for c in plain] == [
        {"destination_port": p} for p in (15020, 15021, 15090, 5432)
    ]
    assert {_cluster(c) for c in plain} == {"passthrough"}
    none = [c["name"] for c in _outbound_chains(BootstrapOptions(**BASE, plaintext_ports=()))]
    assert "outbound-plain-53" not in none


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"api_servers": (("kubernetes.default", 443),)}, "kubernetes.default"),
        ({"api_servers": (("10.96.0.1", 0),)}, "API server port of 10.96.0.1"),
        ({"plaintext_ports": (70000,)}, "plaintext port: port 70000 is outside 1-65535"),
    ],
)
def test_bad_exemptions_are_refused_by_name(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_bootstrap(BootstrapOptions(**BASE, **extra))
