"""The one API call the CNI plugin makes: get the pod, for its annotations.

It runs on the node, inside the runtime's sandbox creation, with the node agent's kubeconfig
(written by ``sidemesh cni install``; RBAC: ``get pods``) and a short timeout. A pod that cannot
be looked up is an error, never "not injected": guessing wrong would start a meshed pod
without its traffic capture.
"""

from __future__ import annotations

from webhook.cni.spec import ERR_TRY_AGAIN, CNIError

__all__ = ["read_annotations"]


def read_annotations(
    kubeconfig: str, namespace: str, name: str, *, timeout: float
) -> dict[str, str]:
    """The pod's ``metadata.annotations`` (``CNIError`` "try again later" when unreachable)."""
    from webhook.kube.client import KubeAPIError, KubeClient

    where = f"pod {namespace}/{name}"
    try:
        kube = KubeClient.connect(kubeconfig=kubeconfig, timeout=timeout)
    except KubeAPIError as exc:
        msg = f"sidemesh: cannot load kubeconfig {kubeconfig}: {exc}"
        raise CNIError(ERR_TRY_AGAIN, msg) from None
    try:
        with kube.api_client:
            return kube.pod_annotations(namespace, name)
    except KubeAPIError as exc:
        if exc.status:
            msg = f"sidemesh: the API server refused to return {where}: {exc}"
            raise CNIError(ERR_TRY_AGAIN, msg) from None
        raise CNIError(
            ERR_TRY_AGAIN,
            f"sidemesh: cannot reach the API server to look up {where}; the pod's sandbox is "
            "not created, so that no meshed pod starts without its traffic capture "
            "(the kubelet retries)",
            str(exc),
        ) from None
