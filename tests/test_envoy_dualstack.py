"""Dual-stack pods: what the agent makes of ``POD_IPS`` and what the bootstrap does with it.

The bootstrap of a pod with an IPv6 address listens on both families and hands IPv6
connections to the app from ``::6``; an IPv4-only pod's bootstrap is exactly what it was.
That these configurations carry real IPv6 traffic is shown in
``tests/e2e/test_e2e_dualstack.py``; that Envoy accepts them, by the goldens in
``tests/test_envoy.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from webhook.dataplane.agent import envoy_command, settings_from
from webhook.dataplane.bootstrap import BootstrapOptions, local_address_ip_version, render_bootstrap

FLAGS = {
    "ca_address": "https://ca:443",
    "token_file": "/t",
    "bundle_file": "/b",
    "cert_dir": "/c",
    "work_dir": "/w",
    "envoy_binary": "envoy",
    "log_level": "warning",
    "concurrency": 1,
}
ENV = {"POD_NAME": "cart-1", "POD_NAMESPACE": "shop", "SERVICE_ACCOUNT": "cart"}


def _listeners(opts: BootstrapOptions) -> dict[str, dict[str, Any]]:
    boot = render_bootstrap(opts)
    return {lst["name"]: lst for lst in boot["static_resources"]["listeners"]}


def _addresses(listener: dict[str, Any]) -> list[str]:
    found = [listener["address"], *(a["address"] for a in listener.get("additional_addresses", []))]
    return [f"{a['socket_address']['address']}:{a['socket_address']['port_value']}" for a in found]


def _app_bind(opts: BootstrapOptions) -> dict[str, Any]:
    clusters = render_bootstrap(opts)["static_resources"]["clusters"]
    app = next(c for c in clusters if c["name"] == "inbound_app")
    bind: dict[str, Any] = app["upstream_bind_config"]
    return bind


def _options(env: dict[str, str]) -> BootstrapOptions:
    return settings_from(FLAGS, {**ENV, **env}).bootstrap_options()


def test_dual_stack_pod_listens_on_both_families() -> None:
    opts = _options({"POD_IP": "10.1.2.3", "POD_IPS": "10.1.2.3,fd00:1::3"})
    assert opts.ipv4 and opts.ipv6
    listeners = _listeners(opts)
    assert _addresses(listeners["outbound"]) == ["127.0.0.1:15001", "::1:15001"]
    assert _addresses(listeners["inbound"]) == ["0.0.0.0:15006", ":::15006"]
    assert _addresses(listeners["health"]) == ["0.0.0.0:15021", ":::15021"]
    assert _addresses(listeners["stats"]) == ["0.0.0.0:15090", ":::15090"]
    bind = _app_bind(opts)
    assert bind["source_address"]["address"] == "127.0.0.6"
    assert [x["address"]["address"] for x in bind["extra_source_addresses"]] == ["::6"]


def test_ipv4_only_pod_is_unchanged() -> None:
    for env in ({"POD_IP": "10.1.2.3", "POD_IPS": "10.1.2.3"}, {"POD_IP": "10.1.2.3"}, {}):
        opts = _options(env)
        assert (opts.ipv4, opts.ipv6) == (True, False), env
        assert all("additional_addresses" not in lst for lst in _listeners(opts).values())
        assert "extra_source_addresses" not in _app_bind(opts)


@pytest.mark.parametrize(
    ("env", "version"),
    [
        ({"POD_IP": "10.1.2.3", "POD_IPS": "10.1.2.3,fd00:1::3"}, "v4"),
        ({"POD_IP": "fd00:1::3", "POD_IPS": "fd00:1::3,10.1.2.3"}, "v4"),  # IPv6-first cluster
        ({"POD_IP": "fd00:1::3", "POD_IPS": "fd00:1::3"}, "v6"),  # IPv6-only
        ({"POD_IP": "fd00:1::3"}, "v6"),
        ({"POD_IP": "10.1.2.3"}, "v4"),
    ],
)
def test_envoy_reports_a_local_address_of_a_family_the_pod_has(
    env: dict[str, str], version: str
) -> None:
    s = settings_from(FLAGS, {**ENV, **env})
    assert local_address_ip_version(s.bootstrap_options()) == version
    argv = envoy_command(s, Path("/w/envoy.json"))
    assert argv[argv.index("--local-address-ip-version") + 1] == version


def test_ipv6_only_pod_still_has_ipv4_loopback_listeners() -> None:
    # lo keeps 127.0.0.1 in an IPv6-only pod: the IPv4 address stays the listeners' main one
    opts = _options({"POD_IP": "fd00:1::3", "POD_IPS": "fd00:1::3"})
    assert (opts.ipv4, opts.ipv6) == (False, True)
    assert _addresses(_listeners(opts)["outbound"]) == ["127.0.0.1:15001", "::1:15001"]
    with pytest.raises(ValueError, match="IPv4 or an IPv6"):
        render_bootstrap(BootstrapOptions("p", "ns", "sa", ipv4=False, ipv6=False))


def test_agent_knows_whether_the_ipv6_passthrough_source_is_on_lo(tmp_path: Path) -> None:
    from webhook.dataplane.agent import _on_loopback

    proc = tmp_path / "if_inet6"
    eth0 = "fd00005e000000000000000000000003 02 40 00 80     eth0\n"
    six_on_lo = "00000000000000000000000000000006 01 80 00 c0       lo\n"
    proc.write_text(eth0)
    assert not _on_loopback("::6", proc)
    proc.write_text(eth0 + six_on_lo)
    assert _on_loopback("::6", proc)
    proc.write_text(six_on_lo.replace(" lo", " eth0"))  # elsewhere does not count
    assert not _on_loopback("::6", proc)
    assert not _on_loopback("::6", tmp_path / "missing")  # IPv6 disabled in the kernel
