"""The few kube-apiserver calls the CA makes, through the official ``kubernetes`` client.

* ``TokenReview`` (``authentication.k8s.io/v1``): is this bearer token valid for audience
  ``sidemesh-ca``, and whose is it?
* ``MutatingWebhookConfiguration`` ``sidemesh-injector``: read it, and patch the ``caBundle`` of
  every webhook in it to the mesh root. The RBAC that goes with it is get/patch on that one
  resource name; nothing here lists or watches.
* Secret ``sidemesh-tls`` in ``sidemesh-system``: read it, and replace its ``tls.crt``/``tls.key``
  when the serving certificate is due (RBAC: get/update on that one name). In a cluster the
  cert dir is a read-only Secret mount, so this is how the server renews its own certificate;
  the kubelet then swaps the mounted files and :mod:`webhook.server.tlsreload` picks them up.

Everything is blocking (the client is urllib3-based); async callers run these in a thread.
Answers are handled as plain dicts (``_preload_content=False``), so fields the client's models
do not know survive untouched.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Callable
from typing import Any

from webhook import names
from webhook.ca.tokens import ReviewResult
from webhook.errors import SidemeshError

__all__ = [
    "KubeAPIError",
    "api_client",
    "in_cluster",
    "patch_ca_bundle",
    "read_ca_bundles",
    "read_secret_data",
    "token_reviewer",
    "update_secret_data",
]

log = logging.getLogger(__name__)

#: The user.extra key under which the API server names the pod a bound token belongs to.
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
_TIMEOUT = 10.0
#: The serving certificate's Secret (created by ``sidemesh install``, mounted into --cert-dir).
TLS_SECRET = "sidemesh-tls"


class KubeAPIError(SidemeshError):
    """The API server refused a call or could not be reached; ``status`` is 0 for the latter."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


def in_cluster() -> bool:
    """Whether we run in a pod with a service-account token mounted (in-cluster config)."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and os.path.exists(
        "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )


def api_client(
    *,
    host: str | None = None,
    token: str | None = None,
    ca_file: str | None = None,
    kubeconfig: str | None = None,
) -> Any:
    """A ``kubernetes.client.ApiClient``: explicit ``host`` (+ ``token``, ``ca_file``), else
    ``kubeconfig``, else the in-cluster service account. TLS verification is always on."""
    from kubernetes import client, config

    cfg = client.Configuration()
    if host is not None:
        cfg.host = host
        cfg.proxy = None  # explicit hosts (the tests' stand-in) are reached directly
        if token:
            cfg.api_key = {"BearerToken": token}
            cfg.api_key_prefix = {"BearerToken": "Bearer"}
        cfg.ssl_ca_cert = ca_file
    elif kubeconfig is not None:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)  # type: ignore[no-untyped-call]
    else:
        config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    cfg.verify_ssl = True
    return client.ApiClient(cfg)


def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a client call with ``_preload_content=False`` and return the decoded JSON body."""
    from kubernetes.client.exceptions import ApiException

    try:
        resp = fn(*args, _preload_content=False, _request_timeout=_TIMEOUT, **kwargs)
    except ApiException as exc:
        raise KubeAPIError(exc.status or 0, _status_message(exc)) from None
    except OSError as exc:  # connection refused, TLS failure, timeout (urllib3 wraps in OSError)
        raise KubeAPIError(0, f"cannot reach the API server: {exc}") from None
    except Exception as exc:  # urllib3.exceptions.* that are not OSErrors
        if type(exc).__module__.startswith("urllib3"):
            raise KubeAPIError(0, f"cannot reach the API server: {exc}") from None
        raise
    return json.loads(resp.data)


def _status_message(exc: Any) -> str:
    try:
        body = json.loads(exc.body)
        return f"{exc.status} {body.get('reason', '')}: {body.get('message', '')}".strip()
    except (TypeError, ValueError, AttributeError):
        return f"{exc.status} {exc.reason}"


# --- TokenReview ----------------------------------------------------------------------------


def token_reviewer(
    api: Any, audiences: tuple[str, ...] = (names.TOKEN_AUDIENCE,)
) -> Callable[[str], ReviewResult]:
    """A blocking ``token -> ReviewResult`` for :class:`webhook.ca.tokens.TokenReviewVerifier`."""
    from kubernetes import client

    auth = client.AuthenticationV1Api(api)

    def review(token: str) -> ReviewResult:
        body = client.V1TokenReview(
            api_version="authentication.k8s.io/v1",
            kind="TokenReview",
            spec=client.V1TokenReviewSpec(token=token, audiences=list(audiences)),
        )
        answer = _call(auth.create_token_review, body)
        status = answer.get("status") or {}
        user = status.get("user") or {}
        pods = (user.get("extra") or {}).get(POD_NAME_EXTRA) or []
        return ReviewResult(
            authenticated=bool(status.get("authenticated")),
            username=str(user.get("username") or ""),
            audiences=tuple(status.get("audiences") or ()),
            pod_name=pods[0] if pods else None,
            error=str(status.get("error") or ""),
        )

    return review


# --- the MutatingWebhookConfiguration's caBundle -------------------------------------------------


def read_ca_bundles(api: Any, name: str = names.WEBHOOK_CONFIGURATION) -> list[str | None]:
    """The decoded ``caBundle`` PEM of each webhook in ``name`` (``None`` where unset)."""
    from kubernetes import client

    obj = _call(client.AdmissionregistrationV1Api(api).read_mutating_webhook_configuration, name)
    out: list[str | None] = []
    for hook in obj.get("webhooks") or []:
        raw = (hook.get("clientConfig") or {}).get("caBundle")
        out.append(base64.b64decode(raw).decode() if raw else None)
    return out


def patch_ca_bundle(
    api: Any, bundle_pem: str, name: str = names.WEBHOOK_CONFIGURATION, *, attempts: int = 3
) -> int:
    """Set every webhook's ``caBundle`` in ``name`` to ``bundle_pem``; return how many changed.

    A JSON patch guarded by a ``test`` of the resourceVersion: when another replica changed the
    object in between, the patch fails (409/422) and we read again, so a concurrent edit of
    another field is never overwritten. Nothing is sent when every bundle already matches.
    """
    from kubernetes import client

    adm = client.AdmissionregistrationV1Api(api)
    wanted = base64.b64encode(bundle_pem.encode()).decode()
    for attempt in range(attempts):
        obj = _call(adm.read_mutating_webhook_configuration, name)
        ops: list[dict[str, Any]] = [
            {
                "op": "test",
                "path": "/metadata/resourceVersion",
                "value": obj["metadata"]["resourceVersion"],
            }
        ]
        for i, hook in enumerate(obj.get("webhooks") or []):
            if "clientConfig" not in hook:
                ops.append({"op": "add", "path": f"/webhooks/{i}/clientConfig", "value": {}})
            if (hook.get("clientConfig") or {}).get("caBundle") != wanted:
                ops.append(
                    {"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": wanted}
                )
        changed = sum(1 for op in ops if op["path"].endswith("/caBundle"))
        if not changed:
            return 0
        try:
            _call(
                adm.patch_mutating_webhook_configuration,
                name,
                ops,
                _content_type="application/json-patch+json",
            )
        except KubeAPIError as exc:
            if exc.status in (409, 422) and attempt + 1 < attempts:
                log.info("caBundle patch of %s raced another writer; retrying", name)
                continue
            raise
        log.info("patched caBundle of %d webhook(s) in %s", changed, name)
        return changed
    raise KubeAPIError(409, f"{name} kept changing; caBundle not patched")  # pragma: no cover


# --- the serving certificate's Secret ----------------------------------------------------------


def read_secret_data(
    api: Any, name: str = TLS_SECRET, namespace: str = names.CONTROL_PLANE_NAMESPACE
) -> dict[str, bytes]:
    """The decoded ``data`` of Secret ``namespace/name``."""
    from kubernetes import client

    obj = _call(client.CoreV1Api(api).read_namespaced_secret, name, namespace)
    return _decoded(obj)


def update_secret_data(
    api: Any,
    change: Callable[[dict[str, bytes]], dict[str, bytes] | None],
    name: str = TLS_SECRET,
    namespace: str = names.CONTROL_PLANE_NAMESPACE,
    *,
    attempts: int = 3,
) -> bool:
    """Read Secret ``namespace/name``, let ``change(data)`` decide, write its answer back.

    ``change`` returns the keys to set (other keys are kept), or ``None`` for "nothing to do".
    The write is a PUT of the object as read, so it carries that ``resourceVersion``: when
    another replica wrote in between, the API server answers 409 Conflict and we read again
    and ask ``change`` again — which then normally finds the other replica's result good
    enough and returns ``None``. So concurrent writers cannot both win. True when written.
    """
    from kubernetes import client

    core = client.CoreV1Api(api)
    for attempt in range(attempts):
        obj = _call(core.read_namespaced_secret, name, namespace)
        wanted = change(_decoded(obj))
        if wanted is None:
            return False
        data = dict(obj.get("data") or {})
        data.update({k: base64.b64encode(v).decode("ascii") for k, v in wanted.items()})
        obj["data"] = data
        try:
            _call(core.replace_namespaced_secret, name, namespace, obj)
        except KubeAPIError as exc:
            if exc.status == 409 and attempt + 1 < attempts:
                log.info("update of Secret %s/%s raced another writer; re-reading", namespace, name)
                continue
            raise
        return True
    raise KubeAPIError(
        409, f"Secret {namespace}/{name} kept changing; not updated"
    )  # pragma: no cover


def _decoded(secret: dict[str, Any]) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
