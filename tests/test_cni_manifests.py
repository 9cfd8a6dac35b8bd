"""The CNI-mode component (manifests/components/cni) as a platform team reviews it: it switches
the mesh config to ``cni: true`` and nothing else, its RBAC is ``get pods`` and nothing else,
its DaemonSet mounts only the two CNI directories from the host, holds no capability, and runs
the installer with flags that parse and point at those mounts. Schemas are Kubernetes' own."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from tests.conftest import REPO, require_tools
from webhook.config import load_config
from webhook.install.render import kustomize_build

MANIFESTS = REPO / "manifests"
Obj = dict[str, Any]


def overlay(tmp: Path, components: list[str]) -> list[Obj]:
    (tmp / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(MANIFESTS, tmp)],
                "components": [
                    os.path.relpath(MANIFESTS / "components" / c, tmp) for c in components
                ],
            }
        )
    )
    return kustomize_build(tmp)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Obj], list[Obj]]:
    require_tools("kubectl")
    return (
        overlay(tmp_path_factory.mktemp("base"), []),
        overlay(tmp_path_factory.mktemp("cni"), ["cni"]),
    )


def one(objects: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].startswith(name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def mesh_config(objects: list[Obj]) -> Obj:
    data: Obj = yaml.safe_load(one(objects, "ConfigMap", "sidemesh-config")["data"]["config.yaml"])
    return data


def test_component_turns_on_cni_mode_and_changes_nothing_else(
    built: tuple[list[Obj], list[Obj]],
) -> None:
    base, cni = built
    config = mesh_config(cni)
    assert config.pop("cni") is True
    assert config == mesh_config(base), "the component's config.yaml drifted from the base's"
    assert load_config(mesh_config(cni)).cni
    added = {(o["kind"], o["metadata"]["name"]) for o in cni} - {
        (o["kind"], o["metadata"]["name"]) for o in base
    }
    kinds = sorted(k for k, _ in added)
    assert kinds == [
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
        "ServiceAccount",
    ]


def test_node_agent_may_only_get_pods(built: tuple[list[Obj], list[Obj]]) -> None:
    cni = built[1]
    assert one(cni, "ClusterRole", "sidemesh-cni")["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}
    ]
    binding = one(cni, "ClusterRoleBinding", "sidemesh-cni")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "sidemesh-cni", "namespace": "kube-system"}
    ]
    ds = one(cni, "DaemonSet", "sidemesh-cni")
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == "sidemesh-cni"


def test_daemonset_touches_only_the_cni_directories(built: tuple[list[Obj], list[Obj]]) -> None:
    from webhook.cli.main import build_parser

    spec = one(built[1], "DaemonSet", "sidemesh-cni")["spec"]["template"]["spec"]
    host = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert sorted(host.values()) == ["/etc/cni/net.d", "/opt/cni/bin"]
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(key)
    (container,) = spec["containers"]
    sc = container["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    args = build_parser().parse_args(container["command"][1:] + container["args"])
    assert mounts[str(args.bin_dir)] == "cni-bin" and host["cni-bin"] == "/opt/cni/bin"
    assert mounts[str(args.net_dir)] == "cni-net" and host["cni-net"] == args.node_net_dir
    assert str(args.ready_file.parent) in mounts
    assert container["readinessProbe"]["exec"]["command"][-1] == str(args.ready_file)
    assert spec["tolerations"] == [{"operator": "Exists"}], "every node needs the agent"


@pytest.mark.parametrize("version", [latest_version(), "1.30.0"])
def test_component_validates(built: tuple[list[Obj], list[Obj]], version: str) -> None:
    for obj in built[1]:
        kubernetes_validate.validate(obj, version, strict=True)
