"""What the install puts into the cluster, rendered from ``manifests/`` by the real kustomize.

``kubectl kustomize`` builds a throwaway overlay of ``manifests/`` (image, failure-policy
component, proxy images in the mesh config); the webhook's ``caBundle`` is added to the rendered
objects here. The build contacts no cluster.
"""

from __future__ import annotations

import base64
import copy
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml

from webhook import names
from webhook.config import DEFAULT_IMAGE, load_config
from webhook.install.runner import InstallError, run_subprocess

__all__ = ["MANIFESTS", "FailurePolicy", "kustomize_build", "render", "with_ca_bundle"]

#: The kustomize base, next to the package in a source checkout.
MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
NAMESPACE = names.CONTROL_PLANE_NAMESPACE

FailurePolicy = Literal["Fail", "Ignore"]


def kustomize_build(directory: Path, *, kubectl: str = "kubectl") -> list[dict[str, Any]]:
    """``kubectl kustomize DIRECTORY`` parsed into objects (the build contacts no cluster)."""
    done = run_subprocess([kubectl, "kustomize", str(directory)])
    if done.returncode != 0:
        raise InstallError(f"kustomize build of {directory} failed: {done.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def render(
    manifests: Path,
    *,
    image: str | None = None,
    failure_policy: FailurePolicy = "Fail",
    kubectl: str = "kubectl",
) -> list[dict[str, Any]]:
    """The control plane as kustomize builds it from a throwaway overlay of ``manifests``.

    ``image`` replaces the sidemesh image everywhere: the Deployment (kustomize ``images``) and
    the proxy and init images in the mesh config (a merged ``configMapGenerator``, which also
    gives the ConfigMap a new hash so the servers roll). ``Ignore`` adds the
    ``components/failure-policy-ignore`` component.
    """
    manifests = manifests.resolve()
    if not (manifests / "kustomization.yaml").is_file():
        raise InstallError(
            f"no kustomization.yaml in {manifests}: run from a sidemesh checkout or pass "
            "--manifests DIR"
        )
    with tempfile.TemporaryDirectory(prefix="sidemesh-overlay-") as tmp:
        overlay: dict[str, Any] = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            # kustomize refuses absolute paths here; a relative one reaches anywhere.
            "resources": [os.path.relpath(manifests, tmp)],
        }
        if failure_policy == "Ignore":
            component = manifests / "components" / "failure-policy-ignore"
            overlay["components"] = [os.path.relpath(component, tmp)]
        elif failure_policy != "Fail":
            raise InstallError(f"failure policy must be Fail or Ignore, not {failure_policy!r}")
        if image:
            overlay["images"] = [_image_override(image)]
            (Path(tmp) / "config.yaml").write_text(
                _config_with_image(manifests / "config.yaml", image), encoding="utf-8"
            )
            overlay["configMapGenerator"] = [
                {
                    "name": "sidemesh-config",
                    "namespace": NAMESPACE,
                    "behavior": "merge",
                    "files": ["config.yaml"],
                }
            ]
        (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump(overlay), encoding="utf-8")
        return kustomize_build(Path(tmp), kubectl=kubectl)


def _image_override(image: str) -> dict[str, str]:
    """A kustomize ``images`` entry that turns the default image into ``image``."""
    base_name = DEFAULT_IMAGE.rsplit(":", 1)[0]
    if "@" in image:
        name, digest = image.split("@", 1)
        return {"name": base_name, "newName": name, "digest": digest}
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:  # a tag, not a registry port
        return {"name": base_name, "newName": image[:colon], "newTag": image[colon + 1 :]}
    return {"name": base_name, "newName": image, "newTag": "latest"}


def _config_with_image(path: Path, image: str) -> str:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    proxy = dict(data.get("proxy") or {})
    proxy["image"] = image
    proxy["init_image"] = image
    data["proxy"] = proxy
    load_config(data)  # a bad image string fails here, not in every injected pod
    return yaml.safe_dump(data, sort_keys=False)


def with_ca_bundle(objects: Iterable[dict[str, Any]], root_pem: str) -> list[dict[str, Any]]:
    """Copies of ``objects`` whose MutatingWebhookConfigurations trust ``root_pem``."""
    bundle = base64.b64encode(root_pem.encode()).decode()
    out = []
    for obj in objects:
        obj = copy.deepcopy(obj)
        if obj.get("kind") == "MutatingWebhookConfiguration":
            for hook in obj.get("webhooks") or []:
                hook.setdefault("clientConfig", {})["caBundle"] = bundle
        out.append(obj)
    return out
