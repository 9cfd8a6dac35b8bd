"""Policy tests over the *built* manifests: what a platform team reviews before installing.

The webhook's routing (which pods reach which webhook, which never reach any), least-privilege
RBAC, a control plane that passes Pod Security ``restricted`` (checked here against the
profile's rules, written out below), high availability, and the wiring between objects (the
Service finds the pods, the webhook finds the Service, the server's flags find the mounts).
"""

from __future__ import annotations

import argparse
import copy
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.conftest import REPO, require_tools
from tests.support.kube_objects import one, selector_matches
from tests.support.pod_security import restricted_violations
from webhook import names
from webhook.config import DEFAULT_IMAGE, RESERVED_PORTS, MeshConfig, load_config
from webhook.install.pki import CA_SECRET, TLS_SECRET
from webhook.install.render import kustomize_build

MANIFESTS = REPO / "manifests"
NS = names.CONTROL_PLANE_NAMESPACE
EXCLUDED = ("kube-system", "kube-public", "kube-node-lease", NS)
NS_HOOK, OBJ_HOOK = "namespace.sidemesh.io", "object.sidemesh.io"

Obj = dict[str, Any]


@pytest.fixture(scope="module")
def base() -> list[Obj]:
    require_tools("kubectl")
    return kustomize_build(MANIFESTS)


@pytest.fixture(scope="module")
def samples() -> list[Obj]:
    require_tools("kubectl")
    return kustomize_build(MANIFESTS / "samples")


def pod_spec(base: list[Obj]) -> Obj:
    spec: Obj = one(base, "Deployment", names.SERVICE_NAME)["spec"]["template"]["spec"]
    return spec


def container(base: list[Obj]) -> Obj:
    containers = pod_spec(base)["containers"]
    assert len(containers) == 1
    c: Obj = containers[0]
    return c


# --- label selectors, evaluated like the API server does -------------------------------------


def hooks_called(base: list[Obj], namespace: str, ns_labels: Obj, pod_labels: Obj) -> list[str]:
    config = one(base, "MutatingWebhookConfiguration", names.WEBHOOK_CONFIGURATION)
    # The API server labels every namespace with its own name (Kubernetes 1.21+).
    ns_labels = {**ns_labels, "kubernetes.io/metadata.name": namespace}
    return [
        hook["name"]
        for hook in config["webhooks"]
        if selector_matches(hook.get("namespaceSelector"), ns_labels)
        and selector_matches(hook.get("objectSelector"), pod_labels)
    ]


ENABLED = {names.NAMESPACE_LABEL: "enabled"}
DISABLED = {names.NAMESPACE_LABEL: "disabled"}
POD_TRUE = {names.INJECT: "true"}
POD_FALSE = {names.INJECT: "false"}


@pytest.mark.parametrize(
    ("ns_labels", "pod_labels", "expected"),
    [
        (ENABLED, {}, [NS_HOOK]),
        (ENABLED, {"app": "web"}, [NS_HOOK]),
        (ENABLED, POD_TRUE, [NS_HOOK]),  # once, not by both webhooks
        (ENABLED, POD_FALSE, []),
        ({}, POD_TRUE, [OBJ_HOOK]),
        ({}, {}, []),
        ({}, POD_FALSE, []),
        (DISABLED, POD_TRUE, []),  # a namespace's opt-out beats a pod's opt-in
        (DISABLED, {}, []),
    ],
)
def test_which_webhook_sees_a_pod(
    base: list[Obj], ns_labels: Obj, pod_labels: Obj, expected: list[str]
) -> None:
    assert hooks_called(base, "shop", ns_labels, pod_labels) == expected


@pytest.mark.parametrize("namespace", EXCLUDED)
@pytest.mark.parametrize("ns_labels", [ENABLED, {}])
def test_system_namespaces_never_reach_the_webhook(
    base: list[Obj], namespace: str, ns_labels: Obj
) -> None:
    """Not even when someone labels them: CNI, DNS and the injector itself always start."""
    for pod_labels in ({}, POD_TRUE):
        assert hooks_called(base, namespace, ns_labels, pod_labels) == []


def test_excluded_namespaces_are_the_injectors_ignored_namespaces() -> None:
    assert set(EXCLUDED) == set(MeshConfig().ignored_namespaces)


@pytest.mark.parametrize("hook_name", [NS_HOOK, OBJ_HOOK])
def test_webhook_fields(base: list[Obj], hook_name: str) -> None:
    config = one(base, "MutatingWebhookConfiguration", names.WEBHOOK_CONFIGURATION)
    assert [h["name"] for h in config["webhooks"]] == [NS_HOOK, OBJ_HOOK]
    hook = next(h for h in config["webhooks"] if h["name"] == hook_name)
    assert hook["rules"] == [
        {
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "operations": ["CREATE"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    assert hook["failurePolicy"] == "Fail"
    assert hook["sideEffects"] == "None"
    assert hook["reinvocationPolicy"] == "IfNeeded"
    assert hook["timeoutSeconds"] == 5
    assert hook["matchPolicy"] == "Equivalent"
    assert hook["admissionReviewVersions"] == ["v1", "v1beta1"]
    assert hook["clientConfig"] == {
        "service": {"name": names.SERVICE_NAME, "namespace": NS, "path": "/mutate", "port": 443}
    }, "the base carries no caBundle (sidemesh install adds it) and no URL"


def test_failure_policy_ignore_component_changes_only_the_failure_policy(
    base: list[Obj], tmp_path: Path
) -> None:
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(MANIFESTS, tmp_path)],
                "components": [
                    os.path.relpath(MANIFESTS / "components" / "failure-policy-ignore", tmp_path)
                ],
            }
        )
    )
    overlay = kustomize_build(tmp_path)
    hooks = one(overlay, "MutatingWebhookConfiguration")["webhooks"]
    assert [h["failurePolicy"] for h in hooks] == ["Ignore", "Ignore"]
    expected = copy.deepcopy(base)
    for hook in one(expected, "MutatingWebhookConfiguration")["webhooks"]:
        hook["failurePolicy"] = "Ignore"
    assert overlay == expected


# --- RBAC ----------------------------------------------------------------------------------------


def rules(base: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    for role in base:
        if role["kind"] in ("Role", "ClusterRole"):
            for rule in role.get("rules") or []:
                yield role, rule


def test_rbac_has_no_wildcards_and_no_dangerous_verbs(base: list[Obj]) -> None:
    for role, rule in rules(base):
        assert "aggregationRule" not in role
        for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
            for item in rule.get(field) or []:
                assert "*" not in item, f"{role['kind']}/{role['metadata']['name']}: {field} {item}"
        assert not {"escalate", "bind", "impersonate", "delete"} & set(rule["verbs"])
        if role["metadata"]["name"] != names.DISCOVERY_NAME:  # its list/watch: its own test
            assert not {"list", "watch"} & set(rule["verbs"])


def test_cluster_role_is_exactly_tokenreviews_and_our_webhook(base: list[Obj]) -> None:
    role = one(base, "ClusterRole", names.SERVICE_NAME)
    assert role["rules"] == [
        {
            "apiGroups": ["authentication.k8s.io"],
            "resources": ["tokenreviews"],
            "verbs": ["create"],
        },
        {
            "apiGroups": ["admissionregistration.k8s.io"],
            "resources": ["mutatingwebhookconfigurations"],
            "resourceNames": [names.WEBHOOK_CONFIGURATION],
            "verbs": ["get", "patch"],
        },
    ]


def test_secrets_only_our_own_by_name_in_our_namespace(base: list[Obj]) -> None:
    secret_rules = [(r, rule) for r, rule in rules(base) if "secrets" in rule["resources"]]
    assert secret_rules
    for role, rule in secret_rules:
        assert role["kind"] == "Role" and role["metadata"]["namespace"] == NS
        assert set(rule["resourceNames"]) <= {CA_SECRET, TLS_SECRET}
        assert rule["resources"] == ["secrets"]
    ca_rule = next(rule for _, rule in secret_rules if rule["resourceNames"] == [CA_SECRET])
    assert ca_rule["verbs"] == ["get"], "the server may read the root, never rewrite it"


def test_bindings_grant_only_the_sidemesh_service_account(base: list[Obj]) -> None:
    sa = one(base, "ServiceAccount", names.SERVICE_NAME)
    assert pod_spec(base)["serviceAccountName"] == sa["metadata"]["name"]
    for kind, role_kind in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        binding = one(base, kind, names.SERVICE_NAME)
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NS}
        ]
        assert binding["roleRef"]["kind"] == role_kind
        assert binding["roleRef"]["name"] == names.SERVICE_NAME
        assert one(base, role_kind, names.SERVICE_NAME)
    assert one(base, "RoleBinding")["metadata"]["namespace"] == NS


# --- Pod Security Standards: the restricted profile (tests/support/pod_security.py) -----------


def test_control_plane_pods_satisfy_restricted(base: list[Obj]) -> None:
    assert restricted_violations(pod_spec(base)) == []


def test_restricted_checker_rejects_what_restricted_rejects(base: list[Obj]) -> None:
    """The checker above can fail: each of these edits breaks one rule of the profile."""

    def sc(spec: Obj) -> Obj:
        ctx: Obj = spec["containers"][0]["securityContext"]
        return ctx

    edits: dict[str, Callable[[Obj], object]] = {
        "hostNetwork": lambda s: s.update(hostNetwork=True),
        "hostPath": lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "privileged": lambda s: sc(s).update(privileged=True),
        "escalation": lambda s: sc(s).pop("allowPrivilegeEscalation"),
        "root": lambda s: sc(s).update(runAsUser=0),
        "caps": lambda s: sc(s)["capabilities"].update(add=["NET_ADMIN"]),
        "drop": lambda s: sc(s)["capabilities"].update(drop=["NET_RAW"]),
        "seccomp": lambda s: sc(s).update(seccompProfile={"type": "Unconfined"}),
        "nonroot": lambda s: sc(s).update(runAsNonRoot=False),
        "hostPort": lambda s: s["containers"][0]["ports"][0].update(hostPort=8443),
    }
    for what, edit in edits.items():
        spec = copy.deepcopy(pod_spec(base))
        edit(spec)
        assert restricted_violations(spec), what


def test_namespace_enforces_restricted_and_is_never_injected(base: list[Obj]) -> None:
    labels = one(base, "Namespace", NS)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert labels[names.NAMESPACE_LABEL] == "disabled"
    assert (
        pod_spec(base)
        and one(base, "Deployment", names.SERVICE_NAME)["spec"]["template"]["metadata"]["labels"][
            names.INJECT
        ]
        == "false"
    )


# --- the Deployment, its Service, its PDB, its config ------------------------------------------


def serve_args(base: list[Obj]) -> argparse.Namespace:
    """The container's command line, parsed by the real `sidemesh serve` parser."""
    from webhook.cli.main import build_parser

    c = container(base)
    assert c["command"] == ["sidemesh"]
    args = build_parser().parse_args(c["args"])
    assert args.command == "serve"
    return args


def mounts(base: list[Obj]) -> dict[str, Obj]:
    return {m["mountPath"]: m for m in container(base)["volumeMounts"]}


def volume(base: list[Obj], name: str) -> Obj:
    v: Obj = next(v for v in pod_spec(base)["volumes"] if v["name"] == name)
    return v


def test_high_availability(base: list[Obj]) -> None:
    deployment = one(base, "Deployment", names.SERVICE_NAME)
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    spread = pod_spec(base)["topologySpreadConstraints"]
    by_node = next(t for t in spread if t["topologyKey"] == "kubernetes.io/hostname")
    assert by_node["maxSkew"] == 1 and by_node["whenUnsatisfiable"] == "DoNotSchedule"
    # Tainted nodes (control plane) must not count as empty domains: a replica would hang.
    assert by_node["nodeTaintsPolicy"] == "Honor"
    assert selector_matches(by_node["labelSelector"], pod_labels)
    pdb = one(base, "PodDisruptionBudget", names.SERVICE_NAME)
    assert pdb["spec"]["minAvailable"] == 1 < deployment["spec"]["replicas"]
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert selector_matches(pdb["spec"]["selector"], pod_labels)


def test_probes_hit_the_servers_health_endpoints_over_https(base: list[Obj]) -> None:
    c = container(base)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = c[probe]["httpGet"]
        assert get["path"] == path and get["scheme"] == "HTTPS"
        assert ports[get["port"]] == serve_args(base).port


def test_server_flags_point_at_the_mounted_certs_and_config(base: list[Obj]) -> None:
    args = serve_args(base)
    m = mounts(base)
    certs = m[args.cert_dir]
    assert certs["readOnly"] is True
    sources = volume(base, certs["name"])["projected"]["sources"]
    files = {
        item["path"]: (s["secret"]["name"], item["key"])
        for s in sources
        for item in s["secret"]["items"]
    }
    assert files == {
        "ca.crt": (CA_SECRET, "ca.crt"),
        "ca.key": (CA_SECRET, "ca.key"),  # lets the server sign workload certificates
        "tls.crt": (TLS_SECRET, "tls.crt"),
        "tls.key": (TLS_SECRET, "tls.key"),
    }
    config_dir, config_file = os.path.split(args.config)
    assert m[config_dir]["readOnly"] is True
    cm_name = volume(base, m[config_dir]["name"])["configMap"]["name"]
    assert config_file in one(base, "ConfigMap", cm_name)["data"]
    assert all(mount.get("readOnly") for path, mount in m.items() if path != "/tmp")


def test_container_security_and_resources(base: list[Obj]) -> None:
    c = container(base)
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert pod_spec(base)["securityContext"]["runAsUser"] not in (0, MeshConfig().proxy.uid)
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    assert "memory" in c["resources"]["limits"]


def test_service_reaches_the_webhook_and_metrics_ports(base: list[Obj]) -> None:
    service = one(base, "Service", names.SERVICE_NAME)
    pod_labels = one(base, "Deployment", names.SERVICE_NAME)["spec"]["template"]["metadata"][
        "labels"
    ]
    assert selector_matches({"matchLabels": service["spec"]["selector"]}, pod_labels)
    named = {p["name"]: p["containerPort"] for p in container(base)["ports"]}
    ports = {p["port"]: named[p["targetPort"]] for p in service["spec"]["ports"]}
    args = serve_args(base)
    assert ports[443] == args.port == 8443
    assert args.metrics_port in ports.values()
    hook_service = one(base, "MutatingWebhookConfiguration")["webhooks"][0]["clientConfig"][
        "service"
    ]
    assert (hook_service["name"], hook_service["namespace"]) == (
        service["metadata"]["name"],
        service["metadata"]["namespace"],
    )
    assert hook_service["port"] in ports


def test_mesh_config_is_valid_and_uses_the_one_image(base: list[Obj]) -> None:
    cm_name = volume(base, "config")["configMap"]["name"]
    config = load_config(yaml.safe_load(one(base, "ConfigMap", cm_name)["data"]["config.yaml"]))
    image = container(base)["image"]
    assert image == config.proxy.image == config.proxy.init_image == DEFAULT_IMAGE
    ca = urlsplit(config.ca_address)
    assert (ca.hostname, ca.port) == (f"{names.SERVICE_NAME}.{NS}.svc", 443)


# --- samples -------------------------------------------------------------------------------------


def test_samples_client_calls_the_server_through_its_service(samples: list[Obj]) -> None:
    ns = one(samples, "Namespace")
    assert ns["metadata"]["labels"][names.NAMESPACE_LABEL] == "enabled"
    name = ns["metadata"]["name"]
    service = one(samples, "Service")
    server = one(samples, "Deployment", "greeter-server")
    assert selector_matches(
        {"matchLabels": service["spec"]["selector"]},
        server["spec"]["template"]["metadata"]["labels"],
    )
    named = {
        p["name"]: p["containerPort"]
        for p in server["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert service["spec"]["ports"][0]["targetPort"] in named
    url = f"http://{service['metadata']['name']}.{name}.svc.cluster.local/"
    client = one(samples, "Deployment", "greeter-client")["spec"]["template"]["spec"]
    job = one(samples, "Job")["spec"]["template"]["spec"]
    assert url in " ".join(client["containers"][0]["args"])
    assert any(a.startswith(url) for a in job["containers"][0]["args"])
    assert job["restartPolicy"] == "Never"
    # Each workload has its own service account, hence its own SPIFFE identity.
    assert client["serviceAccountName"] != server["spec"]["template"]["spec"]["serviceAccountName"]


def test_sample_apps_do_not_collide_with_the_proxy(samples: list[Obj]) -> None:
    proxy_uid = MeshConfig().proxy.uid
    for obj in samples:
        if obj["kind"] not in ("Deployment", "Job"):
            continue
        spec = obj["spec"]["template"]["spec"]
        assert obj["metadata"]["namespace"] == one(samples, "Namespace")["metadata"]["name"]
        assert spec["securityContext"]["runAsUser"] != proxy_uid
        for c in spec["containers"]:
            assert not {p["containerPort"] for p in c.get("ports", [])} & set(RESERVED_PORTS)
