"""AccessPolicy: parsing (errors name the field), selection, and the RBAC configs it compiles to."""

from __future__ import annotations

from typing import Any

import pytest

from webhook.discovery.resources import encode
from webhook.policy.compiler import ECDS_NAMES, compile_workload, policies_for, rule_ids
from webhook.policy.envoy import EXTENSION_CONFIG, with_authz
from webhook.policy.gate import GATE
from webhook.policy.model import PolicyError, Source, parse_policies, parse_policy

TD = "cluster.local"


def obj(spec: Any, name: str = "p", namespace: str = "shop") -> dict[str, Any]:
    return {
        "apiVersion": "sidemesh.io/v1alpha1",
        "kind": "AccessPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"action": "PERMIT"}, "spec.action must be one of ALLOW, DENY, AUDIT: 'PERMIT'"),
        ({"rules": [{"from": [{"principal": "frontend"}]}]}, "rules[0].from[0].principal"),
        ({"rules": [{"from": [{"namespace": "a", "principal": "b"}]}]}, "exactly one of"),
        ({"rules": [{"to": {"ports": [0]}}]}, "rules[0].to.ports: 0 is not a port"),
        ({"rules": [{"to": {"methods": ["get"]}}]}, "'get' is not an HTTP method"),
        ({"rules": [{"to": {"paths": ["/a*b"]}}]}, "paths: '/a*b'"),
        ({"rules": [{"when": {}}]}, "unknown field(s) ['when']"),
        ({"selector": {"matchExpressions": []}}, "spec.selector supports matchLabels only"),
        ({"rules": [{"from": [{"authenticated": "yes"}]}]}, "authenticated must be true"),
    ],
)
def test_a_bad_policy_is_refused_naming_the_field(spec: Any, message: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(obj(spec))
    assert "AccessPolicy shop/p" in str(info.value)
    assert message in str(info.value)


def test_one_bad_policy_does_not_stop_the_others() -> None:
    good, bad = parse_policies([obj({"action": "DENY"}, "ok"), obj({"action": "?"}, "bad")])
    assert [p.id for p in good] == ["shop/ok"]
    assert list(bad) == ["shop/bad"]


def test_service_account_defaults_to_the_policy_namespace() -> None:
    p = parse_policy(obj({"rules": [{"from": [{"serviceAccount": "web"}]}]}))
    assert p.rules[0].sources == (Source("serviceAccount", "shop/web"),)


def test_selection_by_labels_namespace_and_mesh_root() -> None:
    by_label = parse_policy(obj({"selector": {"matchLabels": {"app": "db"}}}, "db"))
    whole_ns = parse_policy(obj({}, "ns"))
    mesh = parse_policy(obj({}, "mesh", namespace="sidemesh-system"))
    all_ = [by_label, whole_ns, mesh]

    def ids(ns: str, labels: dict[str, str]) -> list[str]:
        return [p.id for p in policies_for(all_, ns, labels, "sidemesh-system")]

    assert ids("shop", {"app": "db"}) == ["shop/db", "shop/ns", "sidemesh-system/mesh"]
    assert ids("shop", {"app": "web"}) == ["shop/ns", "sidemesh-system/mesh"]
    assert ids("other", {"app": "db"}) == ["sidemesh-system/mesh"]


def _filters(*specs: Any) -> dict[str, Any]:
    policies = [parse_policy(obj(s, f"p{i}")) for i, s in enumerate(specs)]
    return {k: dict(v) for k, v in compile_workload(policies, TD).filters.items()}


def test_no_policy_compiles_to_filters_that_pass_everything() -> None:
    filters = _filters()
    assert set(filters) == {*ECDS_NAMES["http"], *ECDS_NAMES["tcp"]}
    assert all("rules" not in f and "shadow_rules" not in f for f in filters.values())


def test_default_deny_is_an_allow_policy_without_rules() -> None:
    allow = _filters({"action": "ALLOW"})["sidemesh.authz.http.allow"]
    assert allow["rules"]["action"] == "ALLOW" and allow["rules"]["policies"] == {}


def test_sources_become_verified_principals_never_headers() -> None:
    spec = {
        "rules": [
            {
                "from": [
                    {"serviceAccount": "front/web"},
                    {"namespace": "ops"},
                    {"principal": "spiffe://other.td/*"},
                    {"unauthenticated": True},
                ]
            }
        ]
    }
    rule = _filters(spec)["sidemesh.authz.http.allow"]["rules"]["policies"]["shop/p0"]
    assert rule["principals"] == [
        {"authenticated": {"principal_name": {"exact": "spiffe://cluster.local/ns/front/sa/web"}}},
        {"authenticated": {"principal_name": {"prefix": "spiffe://cluster.local/ns/ops/sa/"}}},
        {"authenticated": {"principal_name": {"prefix": "spiffe://other.td/"}}},
        {"not_id": {"authenticated": {}}},
    ]


def test_http_fields_on_tcp_allow_admit_nothing_and_deny_more() -> None:
    http_only = {"from": [{"namespace": "a"}], "to": {"ports": [80], "paths": ["/x"]}}
    allow = _filters({"action": "ALLOW", "rules": [http_only]})
    deny = _filters({"action": "DENY", "rules": [http_only]})
    assert allow["sidemesh.authz.tcp.allow"]["rules"]["policies"] == {}
    tcp_deny = deny["sidemesh.authz.tcp.deny"]["rules"]["policies"]["shop/p0"]
    assert tcp_deny["permissions"] == [{"destination_port": 80}]
    http_deny = deny["sidemesh.authz.http.deny"]["rules"]["policies"]["shop/p0"]
    assert http_deny["permissions"] == [
        {
            "and_rules": {
                "rules": [{"destination_port": 80}, {"url_path": {"path": {"exact": "/x"}}}]
            }
        }
    ]


def test_audit_policies_are_shadow_rules_of_the_deny_filter() -> None:
    f = _filters({"action": "AUDIT", "rules": [{}]})["sidemesh.authz.http.deny"]
    assert "rules" not in f
    assert list(f["shadow_rules"]["policies"]) == ["shop/p0"]


def test_each_rule_has_its_own_name_for_stats_and_bodies() -> None:
    p = parse_policy(obj({"rules": [{}, {}]}))
    assert rule_ids(p) == ["shop/p#1", "shop/p#2"]


def test_every_compiled_config_is_a_valid_envoy_message() -> None:
    spec = {
        "action": "DENY",
        "rules": [
            {
                "from": [{"authenticated": True}],
                "to": {
                    "ports": [80, 81],
                    "paths": ["/a", "/b*", "*.png", "*"],
                    "methods": ["GET", "POST"],
                    "headers": {"x-env": "prod", "x-debug": "*"},
                },
            }
        ],
    }
    for name, config in _filters(spec, {"action": "AUDIT"}, {"action": "ALLOW"}).items():
        encode(EXTENSION_CONFIG, {"name": name, "typed_config": config})  # raises if invalid


def test_every_inbound_chain_gets_the_filters_by_name() -> None:
    listener: dict[str, Any] = {
        "name": "inbound",
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {}}]},
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {"http_filters": [{"name": "envoy.filters.http.router"}]},
                    }
                ]
            },
        ],
    }
    out = with_authz(listener)
    tcp, http = (c["filters"] for c in out["filter_chains"])
    # The gate first: it decides at the handshake, before the app is connected.
    assert [f["name"] for f in tcp] == [GATE, *ECDS_NAMES["tcp"], "envoy.filters.network.tcp_proxy"]
    assert tcp[-1]["typed_config"]["upstream_connect_mode"] == "ON_DOWNSTREAM_TLS_HANDSHAKE"
    hcm = http[0]["typed_config"]
    assert [f["name"] for f in hcm["http_filters"]] == [
        *ECDS_NAMES["http"],  # access policy first: a denied request spends no budget
        "sidemesh.ratelimit.local",
        "sidemesh.ratelimit.global",
        "envoy.filters.http.router",
    ]
    assert "local_reply_config" in hcm
    assert listener["filter_chains"][0]["filters"][0]["name"] == "envoy.filters.network.tcp_proxy"
