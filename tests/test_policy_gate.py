"""The TCP gate compiled from a workload's network RBAC configs: which policy decides, as the
CEL Envoy evaluates at the handshake, and the filter's config as sent and as shown back."""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import extension_pb2

from webhook.discovery.model import PodInfo
from webhook.discovery.resources import decode
from webhook.policy.compiler import ECDS_NAMES, compile_workload
from webhook.policy.envoy import EXTENSION_CONFIG
from webhook.policy.gate import AUDIT_KEY, DENIED_KEY, GATE, GATE_TYPE, REFUSED, gate_values
from webhook.policy.model import parse_policy
from webhook.policy.state import AuthzState

WEB = {"matchLabels": {"app": "web"}}


def _object(name: str, action: str, rules: list[dict[str, Any]] | None = None) -> Any:
    spec: dict[str, Any] = {"selector": WEB, "action": action}
    if rules is not None:
        spec["rules"] = rules
    return {"apiVersion": "sidemesh.io/v1alpha1", "kind": "AccessPolicy",
            "metadata": {"name": name, "namespace": "demo"}, "spec": spec}  # fmt: skip


def _policy(name: str, action: str, rules: list[dict[str, Any]] | None = None) -> Any:
    return parse_policy(_object(name, action, rules))


def _gate(*policies: Any) -> dict[str, str]:
    filters = compile_workload(policies, "cluster.local").filters
    deny, allow = (filters[n] for n in ECDS_NAMES["tcp"])
    return {
        v["object_key"]: v["format_string"]["text_format_source"]["inline_string"]
        for v in gate_values(deny, allow)
    }


def test_no_policy_no_gate() -> None:
    assert _gate() == {}


def test_deny_first_then_allow_then_none() -> None:
    deny = _policy("no-other", "DENY", [{"from": [{"serviceAccount": "other"}],
                                         "to": {"ports": [9000]}}])  # fmt: skip
    allow = _policy("clients", "ALLOW", [{"from": [{"namespace": "demo"}]}])
    gate = _gate(deny, allow)
    other = "connection.uri_san_peer_certificate == 'spiffe://cluster.local/ns/demo/sa/other'"
    demo = "connection.uri_san_peer_certificate.startsWith('spiffe://cluster.local/ns/demo/sa/')"
    assert gate[DENIED_KEY] == (
        f"%CEL((destination.port == 9000 && (connection.mtls && {other})) ? 'demo/no-other' : "
        f"(true && (connection.mtls && {demo})) ? '' : 'none')%"
    )
    # A denied connection's app hop goes where nothing listens.
    assert REFUSED in gate["envoy.network.transport_socket.original_dst_address"]
    assert AUDIT_KEY not in gate


def test_an_allow_policy_without_rules_admits_nobody_and_audit_names_itself() -> None:
    audit = _policy("watch", "AUDIT", [{"from": [{"unauthenticated": True}]}])
    gate = _gate(_policy("lockdown", "ALLOW"), audit)
    assert gate[DENIED_KEY] == "%CEL('none')%"
    assert gate[AUDIT_KEY] == "%CEL((true && !(connection.mtls)) ? 'demo/watch' : '')%"


def test_the_gate_is_sent_as_envoy_reads_it_and_shown_back_whole() -> None:
    """The gate goes through the same encoder as every resource: its values in field 2 of the
    set_filter_state Config (on_downstream_tls_handshake, what Envoy 1.40 reads), and decoded
    for /debug/config and proxy-config with every rule in it."""
    deny = _object("no-other", "DENY", [{"from": [{"serviceAccount": "other"}]}])
    audit = _object("watch", "AUDIT", [{"from": [{"unauthenticated": True}]}])
    state = AuthzState("cluster.local")
    state.update([deny, audit])
    pod = PodInfo("demo", "web-1", ("10.244.0.9",), "web", True, "STRICT", labels={"app": "web"})
    sent = state.resources(pod)[GATE]
    ext = extension_pb2.TypedExtensionConfig()
    ext.ParseFromString(sent.body)
    assert (ext.name, ext.typed_config.type_url) == (GATE, GATE_TYPE)
    assert ext.typed_config.value[0] == 0x12  # field 2, length-delimited
    shown = decode(EXTENSION_CONFIG, sent)["typed_config"]["on_downstream_tls_handshake"]
    expected = _gate(_policy("no-other", "DENY", deny["spec"]["rules"]),
                     _policy("watch", "AUDIT", audit["spec"]["rules"]))  # fmt: skip
    assert {v["object_key"]: v["format_string"]["text_format_source"]["inline_string"]
            for v in shown} == expected  # fmt: skip
    assert "'demo/no-other'" in expected[DENIED_KEY] and "'demo/watch'" in expected[AUDIT_KEY]
