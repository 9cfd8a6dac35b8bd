"""The access-policy and rate-limit manifests: CRD schemas that accept what the parser accepts
(and refuse the obvious mistakes), and the optional rate-limit component (service + Redis)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from tests.conftest import REPO, require_tools
from tests.support.kube_objects import one
from tests.support.pod_security import restricted_violations
from webhook.cli.main import build_parser
from webhook.install.pki import CA_SECRET, RATELIMIT_TLS_SECRET
from webhook.install.render import kustomize_build
from webhook.policy.model import parse_policy
from webhook.ratelimit.compiler import SERVICE_ACCOUNT
from webhook.ratelimit.model import parse_limit_policy

MANIFESTS = REPO / "manifests"
Obj = dict[str, Any]


def crd_schema(name: str) -> Obj:
    crd = yaml.safe_load((MANIFESTS / name).read_text())
    schema: Obj = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _cr(kind: str, spec: Obj) -> Obj:
    return {
        "apiVersion": "sidemesh.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": "x", "namespace": "shop"},
        "spec": spec,
    }


ACCESS_OK = [
    {"action": "ALLOW"},
    {
        "selector": {"matchLabels": {"app": "cart"}},
        "action": "DENY",
        "rules": [
            {
                "from": [
                    {"principal": "spiffe://cluster.local/ns/a/sa/*"},
                    {"serviceAccount": "shop/web"},
                    {"namespace": "ops"},
                    {"authenticated": True},
                    {"unauthenticated": True},
                ],
                "to": {"ports": [80], "paths": ["/a*"], "methods": ["GET"], "headers": {"x": "y"}},
            }
        ],
    },
]
ACCESS_BAD = [
    {"action": "PERMIT"},
    {"rules": [{"from": [{"namespace": "a", "principal": "spiffe://x"}]}]},
    {"rules": [{"to": {"ports": [70000]}}]},
    {"rules": [{"to": {"methods": ["get"]}}]},
]
LIMITS_OK = [
    {"limits": [{"requests": 5, "per": "minute", "perCaller": True}]},
    {"failureMode": "Deny", "limits": [{"requests": 1, "per": "second", "scope": "Local",
                                        "match": {"paths": ["/a*"], "methods": ["POST"]}}]},
]  # fmt: skip
LIMITS_BAD = [
    {"limits": []},
    {"limits": [{"requests": 0, "per": "minute"}]},
    {"limits": [{"requests": 5, "per": "fortnight"}]},
    {"failureMode": "Maybe", "limits": [{"requests": 5, "per": "minute"}]},
]


@pytest.mark.parametrize("spec", ACCESS_OK)
def test_access_policy_schema_and_parser_accept_the_same(spec: Obj) -> None:
    jsonschema.validate(_cr("AccessPolicy", spec), crd_schema("accesspolicy-crd.yaml"))
    parse_policy(_cr("AccessPolicy", spec))


@pytest.mark.parametrize("spec", ACCESS_BAD)
def test_access_policy_schema_refuses_what_the_parser_refuses(spec: Obj) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(_cr("AccessPolicy", spec), crd_schema("accesspolicy-crd.yaml"))
    with pytest.raises(ValueError):
        parse_policy(_cr("AccessPolicy", spec))


@pytest.mark.parametrize("spec", LIMITS_OK)
def test_rate_limit_schema_and_parser_accept_the_same(spec: Obj) -> None:
    jsonschema.validate(_cr("RateLimitPolicy", spec), crd_schema("ratelimitpolicy-crd.yaml"))
    parse_limit_policy(_cr("RateLimitPolicy", spec))


@pytest.mark.parametrize("spec", LIMITS_BAD)
def test_rate_limit_schema_refuses_what_the_parser_refuses(spec: Obj) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(_cr("RateLimitPolicy", spec), crd_schema("ratelimitpolicy-crd.yaml"))
    with pytest.raises(ValueError):
        parse_limit_policy(_cr("RateLimitPolicy", spec))


def test_crds_carry_cel_rules_for_what_a_schema_cannot_say() -> None:
    for name in ("accesspolicy-crd.yaml", "ratelimitpolicy-crd.yaml"):
        assert "x-kubernetes-validations" in (MANIFESTS / name).read_text()


@pytest.fixture(scope="module")
def with_ratelimit(tmp_path_factory: pytest.TempPathFactory) -> list[Obj]:
    require_tools("kubectl")
    d: Path = tmp_path_factory.mktemp("overlay")
    (d / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(MANIFESTS, d)],
                "components": [os.path.relpath(MANIFESTS / "components" / "ratelimit", d)],
            }
        )
    )
    return kustomize_build(d)


def test_component_adds_the_service_and_redis_and_tells_discovery(
    with_ratelimit: list[Obj],
) -> None:
    for obj in with_ratelimit:
        kubernetes_validate.validate(obj, latest_version(), strict=True)
    rls = one(with_ratelimit, "Deployment", "sidemesh-ratelimit")
    redis = one(with_ratelimit, "StatefulSet", "sidemesh-redis")
    for workload in (rls, redis):
        assert restricted_violations(workload["spec"]["template"]["spec"]) == []
    assert redis["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    pod = rls["spec"]["template"]["spec"]
    parsed = build_parser().parse_args(pod["containers"][0]["args"])
    assert parsed.redis == "redis://sidemesh-redis.sidemesh-system.svc:6379/0"
    # It reads the limits itself, through the API server, and serves mTLS with the certificate
    # `sidemesh install` issues for its service account (under the names --cert-dir reads).
    assert parsed.kubernetes and parsed.cert_dir == "/etc/sidemesh/certs"
    sources = pod["volumes"][0]["projected"]["sources"]
    mounted = {i["path"]: (src["secret"]["name"], i["key"]) for src in sources
               for i in src["secret"]["items"]}  # fmt: skip
    assert mounted == {
        "ca.crt": (CA_SECRET, "ca.crt"),
        "ratelimit.crt": (RATELIMIT_TLS_SECRET, "tls.crt"),
        "ratelimit.key": (RATELIMIT_TLS_SECRET, "tls.key"),
    }
    assert pod["serviceAccountName"] == SERVICE_ACCOUNT
    disc = one(with_ratelimit, "Deployment", "sidemesh-discovery")
    dargs = build_parser().parse_args(disc["spec"]["template"]["spec"]["containers"][0]["args"])
    assert dargs.ratelimit_address == "sidemesh-ratelimit.sidemesh-system.svc:8081"
    svc = one(with_ratelimit, "Service", "sidemesh-ratelimit")
    assert svc["spec"]["ports"][0]["port"] == 8081
    # Its API access: list+watch of Pods and RateLimitPolicies, nothing else.
    role = one(with_ratelimit, "ClusterRole", "sidemesh-ratelimit")
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}  # fmt: skip
    assert granted == {(g, r, v) for g, r in (("", "pods"), ("sidemesh.io", "ratelimitpolicies"))
                       for v in ("list", "watch")}  # fmt: skip
