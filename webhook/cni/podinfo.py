"""The one API call the CNI plugin makes: get the pod, for its annotations.

It runs on the node, inside the runtime's sandbox creation, with the node agent's kubeconfig
(written by ``sidemesh cni install``; RBAC: ``get pods``) and a short timeout. A pod that cannot
be looked up is an error, never "not injected": guessing wrong would start a meshed pod
without its traffic capture.
"""

from __future__ import annotations

import json
from typing import Any

from webhook.cni.spec import ERR_TRY_AGAIN, CNIError

__all__ = ["read_annotations"]


def read_annotations(
    kubeconfig: str, namespace: str, name: str, *, timeout: float
) -> dict[str, str]:
    """The pod's ``metadata.annotations`` (``CNIError`` "try again later" when unreachable)."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    where = f"pod {namespace}/{name}"
    try:
        api = config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    except Exception as exc:  # the loader raises ConfigException, OSError, yaml errors …
        msg = f"sidemesh: cannot load kubeconfig {kubeconfig}: {exc}"
        raise CNIError(ERR_TRY_AGAIN, msg) from None
    try:
        with api:
            resp: Any = client.CoreV1Api(api).read_namespaced_pod(
                name, namespace, _preload_content=False, _request_timeout=timeout
            )
            pod: Any = json.loads(resp.data)
    except ApiException as exc:
        raise CNIError(
            ERR_TRY_AGAIN,
            f"sidemesh: the API server refused to return {where}: {exc.status} {exc.reason}",
        ) from None
    except Exception as exc:  # urllib3's connection, TLS and timeout errors
        raise CNIError(
            ERR_TRY_AGAIN,
            f"sidemesh: cannot reach the API server to look up {where}; the pod's sandbox is "
            "not created, so that no meshed pod starts without its traffic capture "
            "(the kubelet retries)",
            f"{type(exc).__name__}: {exc}",
        ) from None
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    return {str(k): str(v) for k, v in annotations.items()}
