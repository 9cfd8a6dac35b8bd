"""The CNI protocol values and the conflist edits (pure): what a runtime sends, what the
plugin answers, where the installer puts sidemesh in the chain."""

from __future__ import annotations

import json
from typing import Any

import pytest

from webhook.cni import conflist, spec
from webhook.cni.spec import CNIError, parse_request

ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "abc",
    "CNI_NETNS": "/run/netns/x",
    "CNI_IFNAME": "eth0",
    "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web-0",
}
PREV = {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.5/24"}], "interfaces": [{}]}
CONF = {"cniVersion": "1.0.0", "name": "k8s", "type": "sidemesh-cni", "agent_socket": "/k"}


def request(env: dict[str, str] | None = None, **conf: Any) -> spec.Request:
    return parse_request(env or ENV, json.dumps({**CONF, "prevResult": PREV, **conf}))


def test_add_request_names_the_pod() -> None:
    req = request()
    assert req.pod == ("demo", "web-0")
    assert req.conf is not None and req.conf.prev_result == PREV
    assert req.conf.exclude_namespaces == spec.DEFAULT_EXCLUDE_NAMESPACES


def test_not_a_kubernetes_pod() -> None:
    assert request({**ENV, "CNI_ARGS": ""}).pod is None


@pytest.mark.parametrize(
    ("env", "stdin", "code", "text"),
    [
        ({**ENV, "CNI_COMMAND": "GC"}, "{}", 4, "CNI_COMMAND 'GC'"),
        ({**ENV, "CNI_NETNS": ""}, "{}", 4, "CNI_NETNS is not set"),
        ({**ENV, "CNI_IFNAME": ""}, "{}", 4, "CNI_IFNAME is not set"),
        (
            {**ENV, "CNI_ARGS": "K8S_POD_NAME"},
            json.dumps({**CONF, "prevResult": PREV}),
            4,
            "KEY=VALUE",
        ),
        (ENV, "not json", 6, "not JSON"),
        (ENV, json.dumps({**CONF, "cniVersion": "0.2.0"}), 1, "cniVersion '0.2.0'"),
        (ENV, json.dumps({**CONF, "agent_socket": ""}), 7, "'agent_socket'"),
        (ENV, json.dumps(CONF), 7, "chained after the primary plugin"),
        (ENV, json.dumps({**CONF, "prevResult": PREV, "timeout_seconds": 0}), 7, "timeout"),
    ],
)
def test_bad_requests_name_what_is_wrong(
    env: dict[str, str], stdin: str, code: int, text: str
) -> None:
    with pytest.raises(CNIError) as info:
        parse_request(env, stdin)
    assert info.value.code == code and text in info.value.msg + info.value.details


def test_del_needs_neither_a_namespace_nor_a_previous_result() -> None:
    req = parse_request({**ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": ""}, json.dumps(CONF))
    assert req.command == "DEL" and req.netns == ""


def test_families_from_the_previous_result() -> None:
    assert spec.families(PREV) == (4,)
    dual = {"ips": [{"address": "10.1.0.5/24"}, {"address": "fd00::5/64"}]}
    assert spec.families(dual) == (4, 6)


# --- conflist ------------------------------------------------------------------------------

PRIMARY = {
    "cniVersion": "1.0.0",
    "name": "k8s-pod-network",
    "plugins": [{"type": "bridge", "bridge": "cni0"}, {"type": "portmap"}],
}
ENTRY = {"type": "sidemesh-cni", "agent_socket": "/etc/cni/net.d/sidemesh-cni.sock"}


def test_insert_appends_after_the_primary_chain_once() -> None:
    once = conflist.insert(PRIMARY, ENTRY)
    assert [p["type"] for p in once["plugins"]] == ["bridge", "portmap", "sidemesh-cni"]
    assert conflist.insert(once, ENTRY) == once
    assert conflist.has_entry(once, ENTRY)
    assert not conflist.has_entry(once, {**ENTRY, "timeout_seconds": 3})
    assert conflist.remove(once) == PRIMARY
    assert PRIMARY["plugins"][-1] == {"type": "portmap"}, "the input is not modified"


def test_a_single_plugin_conf_becomes_a_conflist() -> None:
    conf = {"cniVersion": "0.4.0", "name": "net", "type": "bridge", "bridge": "cni0"}
    assert conflist.parse("10-net.conf", json.dumps(conf)) == {
        "cniVersion": "0.4.0",
        "name": "net",
        "plugins": [{"type": "bridge", "bridge": "cni0"}],
    }


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("{", "not JSON"),
        ("[]", "not a JSON object"),
        ('{"plugins": []}', "non-empty list"),
        ('{"name": "x"}', "neither a conflist"),
    ],
)
def test_unusable_config_files_are_named(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        conflist.parse("10-x.conflist", text)


def test_the_runtimes_file_is_the_first_in_lexical_order() -> None:
    names = ["99-z.conflist", "10-calico.conflist", "sidemesh-cni.kubeconfig", ".10-a.conflist"]
    assert conflist.choose(names) == "10-calico.conflist"
    assert conflist.choose(["README", "x.kubeconfig"]) is None
