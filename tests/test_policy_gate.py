"""The TCP gate compiled from a workload's network RBAC configs: which policy decides, as the
CEL Envoy evaluates at the handshake, and the hand-made encoding of the filter's config."""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import extension_pb2
from envoy.extensions.filters.common.set_filter_state.v3 import value_pb2
from google.protobuf import json_format

from webhook.policy.compiler import ECDS_NAMES, compile_workload
from webhook.policy.gate import AUDIT_KEY, DENIED_KEY, GATE, GATE_TYPE, REFUSED, gate_values
from webhook.policy.model import parse_policy
from webhook.policy.state import encode_gate

WEB = {"matchLabels": {"app": "web"}}


def _policy(name: str, action: str, rules: list[dict[str, Any]] | None = None) -> Any:
    spec: dict[str, Any] = {"selector": WEB, "action": action}
    if rules is not None:
        spec["rules"] = rules
    return parse_policy(
        {"apiVersion": "sidemesh.io/v1alpha1", "kind": "AccessPolicy",
         "metadata": {"name": name, "namespace": "demo"}, "spec": spec}
    )  # fmt: skip


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


def test_the_encoding_carries_the_values_as_the_handshake_list() -> None:
    """Field 2 of the set_filter_state Config (on_downstream_tls_handshake), each value a
    FilterStateValue: what Envoy 1.40 reads."""
    values = [{"object_key": DENIED_KEY, "format_string": {"text_format_source":
               {"inline_string": "%CEL('none')%"}}}] * 2  # fmt: skip
    ext = extension_pb2.TypedExtensionConfig()
    ext.ParseFromString(encode_gate(values).body)
    assert (ext.name, ext.typed_config.type_url) == (GATE, GATE_TYPE)
    body, seen = ext.typed_config.value, []
    while body:
        assert body[0] == 0x12  # field 2, length-delimited
        size, body = body[1], body[2:]  # each value is shorter than 128 bytes here
        value = value_pb2.FilterStateValue()
        value.ParseFromString(body[:size])
        seen.append(json_format.MessageToDict(value, preserving_proto_field_name=True))
        body = body[size:]
    assert seen == values
