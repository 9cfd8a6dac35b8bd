"""The one API call CNI mode makes: get the pod, for its annotations.

It runs in the node agent (``sidemesh cni install``), on the plugin's behalf
(:mod:`webhook.cni.agent`), through :class:`webhook.kube.client.KubeClient` with the agent's
own service-account credentials (RBAC: ``get pods``) and a short timeout. A pod that cannot be
looked up is an error, never "not injected": guessing wrong would start a meshed pod without
its traffic capture.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from webhook.cni.spec import ERR_TRY_AGAIN, CNIError
from webhook.errors import SidemeshError

__all__ = ["Credentials", "PodLookup"]

#: (API server URL, bearer token, CA file path)
Credentials = tuple[str, str, str]


class PodLookup:
    """``lookup(namespace, name)`` → annotations. One client for all look-ups, rebuilt when
    ``credentials()`` (read per call, so that a rotated token is used at once) changes."""

    def __init__(self, credentials: Callable[[], Credentials], *, timeout: float) -> None:
        self._credentials = credentials
        self._timeout = timeout
        self._lock = threading.Lock()
        self._current: tuple[Credentials, Any] | None = None

    def _client(self) -> Any:
        from webhook.kube.client import KubeClient

        wanted = self._credentials()
        with self._lock:
            if self._current is None or self._current[0] != wanted:
                host, token, ca_file = wanted
                self._current = (
                    wanted,
                    KubeClient.at(host, token=token, ca_file=ca_file, timeout=self._timeout),
                )
            return self._current[1]

    def warm_up(self) -> bool:
        """Build the client and import what a look-up needs, before the first sandbox asks:
        otherwise the first look-up after the agent starts pays the official client's imports
        within the plugin's timeout, which a busy node can exceed. False when the credentials
        cannot be read yet (the first look-up then reports why)."""
        try:
            client = self._client()
        except SidemeshError:
            return False
        client.preload_pods()
        return True

    def __call__(self, namespace: str, name: str) -> dict[str, str]:
        from webhook.kube.client import KubeAPIError

        where = f"pod {namespace}/{name}"
        try:
            return dict(self._client().pod_annotations(namespace, name))
        except KubeAPIError as exc:
            if exc.status:
                msg = f"sidemesh: the API server refused to return {where}: {exc}"
                raise CNIError(ERR_TRY_AGAIN, msg) from None
            raise CNIError(
                ERR_TRY_AGAIN,
                f"sidemesh: cannot reach the API server to look up {where}; the pod's sandbox "
                "is not created, so that no meshed pod starts without its traffic capture "
                "(the kubelet retries)",
                str(exc),
            ) from None
