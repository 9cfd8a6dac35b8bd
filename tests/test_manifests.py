"""The manifests build with the real kustomize and every object is valid Kubernetes.

Validation is strict (unknown fields fail) against the schemas kubernetes-validate ships for its
newest Kubernetes version and for 1.30, the oldest version sidemesh supports (native sidecars
are on by default from 1.29; 1.30 is the oldest still patched by most providers).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from tests.conftest import REPO, require_tools
from webhook.install.render import kustomize_build

MANIFESTS = REPO / "manifests"
VERSIONS = (latest_version(), "1.30.0")

Obj = dict[str, Any]


def build(path: Path) -> list[Obj]:
    require_tools("kubectl")
    return kustomize_build(path)


def validate_all(objects: list[Obj], version: str) -> None:
    assert objects
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata'].get('name')}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{where} is invalid for Kubernetes {version}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{where}: {exc.message}")


def kinds(objects: list[Obj]) -> list[str]:
    return [o["kind"] for o in objects]


@pytest.fixture(scope="module")
def base() -> list[Obj]:
    return build(MANIFESTS)


@pytest.fixture(scope="module")
def ignore_overlay(tmp_path_factory: pytest.TempPathFactory) -> list[Obj]:
    """A user's overlay that takes the base plus the failure-policy-ignore component."""
    d = tmp_path_factory.mktemp("overlay")
    (d / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(MANIFESTS, d)],
                "components": [
                    os.path.relpath(MANIFESTS / "components" / "failure-policy-ignore", d)
                ],
            }
        )
    )
    return build(d)


def test_base_builds_the_whole_control_plane(base: list[Obj]) -> None:
    # The injector and CA, and discovery (each with its own account, Service, PDB, Deployment).
    per_component = ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment"]
    per_component += ["Service", "PodDisruptionBudget"]
    assert sorted(kinds(base)) == sorted(
        [
            "Namespace",
            *per_component,
            *per_component,
            "Role",
            "RoleBinding",
            "ConfigMap",
            "MutatingWebhookConfiguration",
            "CustomResourceDefinition",  # TrafficPolicy
            "CustomResourceDefinition",  # AccessPolicy
            "CustomResourceDefinition",  # RateLimitPolicy
        ]
    )
    # No private material in the tree: the Secrets come from `sidemesh install` only.
    assert "Secret" not in kinds(base)


@pytest.mark.parametrize("version", VERSIONS)
def test_base_validates(base: list[Obj], version: str) -> None:
    validate_all(base, version)


@pytest.mark.parametrize("version", VERSIONS)
def test_failure_policy_ignore_overlay_validates(ignore_overlay: list[Obj], version: str) -> None:
    validate_all(ignore_overlay, version)


@pytest.mark.parametrize("version", VERSIONS)
def test_samples_validate(version: str) -> None:
    samples = build(MANIFESTS / "samples")
    assert kinds(samples).count("Deployment") == 2 and "Job" in kinds(samples)
    validate_all(samples, version)


@pytest.mark.parametrize("version", VERSIONS)
def test_samples_injected_by_the_cli_validate(version: str, tmp_path: Path) -> None:
    """What the webhook would make of the samples is still valid Kubernetes."""
    require_tools("kubectl")
    stream = tmp_path / "samples.yaml"
    stream.write_text(
        subprocess.check_output(["kubectl", "kustomize", MANIFESTS / "samples"], text=True)
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "webhook",
            "inject",
            "-f",
            str(stream),
            "--config",
            str(MANIFESTS / "config.yaml"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    injected = [d for d in yaml.safe_load_all(done.stdout) if d]
    templates = [
        o["spec"]["template"]["spec"] for o in injected if o["kind"] in ("Deployment", "Job")
    ]
    assert len(templates) == 3
    for spec in templates:
        assert [c["name"] for c in spec["initContainers"]][:2] == [
            "sidemesh-init",
            "sidemesh-proxy",
        ]
    validate_all(injected, version)


def test_strict_validation_catches_a_misspelled_field(base: list[Obj]) -> None:
    """The validator above is not a rubber stamp: an unknown field in a pod spec fails."""
    deployment = copy.deepcopy(next(o for o in base if o["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[0], strict=True)
