"""Policy tests over the built manifests for the discovery side of the control plane: what it may
read (list/watch of four kinds, nothing else), that it passes Pod Security ``restricted``, stays
available, never holds the root key, and that sidecars find it where the mesh config says."""

from __future__ import annotations

import argparse
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, require_tools
from tests.support.kube_objects import one, selector_matches
from tests.support.pod_security import restricted_violations
from webhook import names
from webhook.config import load_config
from webhook.discovery.listwatch import KINDS
from webhook.install.pki import CA_SECRET, DISCOVERY_TLS_SECRET
from webhook.install.render import kustomize_build

Obj = dict[str, Any]
NAME = names.DISCOVERY_NAME
MANIFESTS = REPO / "manifests"
NS = names.CONTROL_PLANE_NAMESPACE


@pytest.fixture(scope="module")
def base() -> list[Obj]:
    require_tools("kubectl")
    return kustomize_build(MANIFESTS)


def deployment(base: list[Obj]) -> Obj:
    return one(base, "Deployment", NAME)


def pod_spec(base: list[Obj]) -> Obj:
    spec: Obj = deployment(base)["spec"]["template"]["spec"]
    return spec


def container(base: list[Obj]) -> Obj:
    (c,) = pod_spec(base)["containers"]
    return c  # type: ignore[no-any-return]


def discovery_args(base: list[Obj]) -> argparse.Namespace:
    """The container's command line, parsed by the real `sidemesh discovery` parser."""
    from webhook.cli.main import build_parser

    c = container(base)
    assert c["command"] == ["sidemesh"]
    args = build_parser().parse_args(c["args"])
    assert args.command == "discovery"
    return args


def test_rbac_is_list_and_watch_of_what_the_source_reads(base: list[Obj]) -> None:
    role = one(base, "ClusterRole", NAME)
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    read = {
        ("" if "/" not in k.api_version else k.api_version.split("/")[0], k.resource.split(".")[0])
        for k in KINDS
    }
    # ... and the one write: the status of the rules and policies (their spec never).
    status = {
        ("gateway.networking.k8s.io", "httproutes/status", "patch"),
        ("gateway.networking.k8s.io", "grpcroutes/status", "patch"),
        ("sidemesh.io", "trafficpolicies/status", "patch"),
        ("sidemesh.io", "accesspolicies/status", "patch"),
        ("sidemesh.io", "ratelimitpolicies/status", "patch"),
    }
    assert granted == {(g, r, v) for g, r in read for v in ("list", "watch")} | status
    assert not any("resourceNames" in rule for rule in role["rules"])
    binding = one(base, "ClusterRoleBinding", NAME)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": NAME,
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": NAME, "namespace": NS}]
    assert one(base, "ServiceAccount", NAME)
    assert pod_spec(base)["serviceAccountName"] == NAME
    # Nothing else is granted to discovery's account, and the injector's account gets none of it.
    for kind in ("RoleBinding", "ClusterRoleBinding"):
        for b in (o for o in base if o["kind"] == kind and o["metadata"]["name"] != NAME):
            assert all(s["name"] != NAME for s in b["subjects"])


def test_discovery_pods_satisfy_restricted_and_are_never_injected(base: list[Obj]) -> None:
    assert restricted_violations(pod_spec(base)) == []
    labels = deployment(base)["spec"]["template"]["metadata"]["labels"]
    assert labels[names.INJECT] == "false"
    assert deployment(base)["metadata"]["namespace"] == NS


def test_discovery_is_highly_available(base: list[Obj]) -> None:
    d = deployment(base)
    assert d["spec"]["replicas"] == 2
    assert d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod_labels = d["spec"]["template"]["metadata"]["labels"]
    spread = pod_spec(base)["topologySpreadConstraints"]
    by_node = next(t for t in spread if t["topologyKey"] == "kubernetes.io/hostname")
    assert by_node["whenUnsatisfiable"] == "DoNotSchedule"
    assert selector_matches(by_node["labelSelector"], pod_labels)
    pdb = one(base, "PodDisruptionBudget", NAME)
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert selector_matches(pdb["spec"]["selector"], pod_labels)
    # The injector's Service and PDB do not count discovery pods, and the reverse.
    injector = one(base, "Deployment", names.SERVICE_NAME)["spec"]["template"]["metadata"]
    assert not selector_matches(pdb["spec"]["selector"], injector["labels"])
    webhook_pdb = one(base, "PodDisruptionBudget", names.SERVICE_NAME)
    assert not selector_matches(webhook_pdb["spec"]["selector"], pod_labels)
    webhook_svc = one(base, "Service", names.SERVICE_NAME)["spec"]["selector"]
    assert not selector_matches({"matchLabels": webhook_svc}, pod_labels)


def test_sidecars_reach_xds_where_the_mesh_config_says(base: list[Obj]) -> None:
    service = one(base, "Service", NAME)
    pod_labels = deployment(base)["spec"]["template"]["metadata"]["labels"]
    assert selector_matches({"matchLabels": service["spec"]["selector"]}, pod_labels)
    named = {p["name"]: p["containerPort"] for p in container(base)["ports"]}
    (port,) = service["spec"]["ports"]  # xDS only: the debug pages stay off the Service
    assert port["port"] == names.DISCOVERY_PORT
    assert named[port["targetPort"]] == int(discovery_args(base).listen.rpartition(":")[2])
    cm = next(o for o in base if o["kind"] == "ConfigMap")
    config = load_config(yaml.safe_load(cm["data"]["config.yaml"]))
    assert config.discovery_address == f"{NAME}.{NS}.svc:{port['port']}"


def test_discovery_reads_the_cluster_with_the_root_cert_but_never_its_key(
    base: list[Obj],
) -> None:
    args = discovery_args(base)
    assert args.kubernetes and args.mesh_dir is None
    mounts = {m["mountPath"]: m for m in container(base)["volumeMounts"]}
    certs = mounts[args.cert_dir]
    assert certs["readOnly"] is True
    volume = next(v for v in pod_spec(base)["volumes"] if v["name"] == certs["name"])
    files = {
        item["path"]: (s["secret"]["name"], item["key"])
        for s in volume["projected"]["sources"]
        for item in s["secret"]["items"]
    }
    assert files == {
        "ca.crt": (CA_SECRET, "ca.crt"),
        "xds.crt": (DISCOVERY_TLS_SECRET, "tls.crt"),
        "xds.key": (DISCOVERY_TLS_SECRET, "tls.key"),
    }
    config_dir = args.config.rpartition("/")[0]
    assert mounts[config_dir]["readOnly"] is True
    assert (
        container(base)["image"]
        == one(base, "Deployment", names.SERVICE_NAME)["spec"]["template"]["spec"]["containers"][0][
            "image"
        ]
    )


def test_probes_use_the_debug_port_which_opens_after_the_first_list(base: list[Obj]) -> None:
    c = container(base)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    args = discovery_args(base)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/healthz" and ports[get["port"]] == args.debug_port
    assert args.debug_host == "0.0.0.0"  # the kubelet probes the pod IP
    assert "memory" in c["resources"]["limits"]
