"""The Kubernetes API as sidemesh uses it: a few typed calls through the official client.

One :class:`KubeClient` serves every role that talks to the API server — ``sidemesh install``
reads the mesh's Secrets with it, the CA's upkeep patches the webhook's ``caBundle`` and renews
the serving certificate with it, the certificates API reviews tokens with it, the CNI node agent
looks pods up with it, and the discovery source lists and watches through its ``api_client``.
The calls take and return plain Python values (``dict[str, bytes]`` for Secret data, PEM
strings, a :class:`~webhook.ca.tokenreview.ReviewResult`); the ``kubernetes`` package and its models
stay inside this module (the discovery list/watch aside, which keeps whole objects as JSON).

* ``TokenReview`` (``authentication.k8s.io/v1``): is this bearer token valid for audience
  ``sidemesh-ca``, and whose is it?
* ``MutatingWebhookConfiguration`` ``sidemesh-injector``: read it, and patch the ``caBundle`` of
  every webhook in it to the mesh root (RBAC: get/patch on that one name; nothing here lists or
  watches).
* Secrets in ``sidemesh-system``: read them, and replace keys of one with a resourceVersion
  guard (RBAC: get/update on ``sidemesh-tls``). In a cluster the cert dir is a read-only Secret
  mount, so this is how the server renews its own certificate; the kubelet then swaps the
  mounted files and :mod:`webhook.server.tlsreload` picks them up.
* Pods: the annotations of one (the CNI node agent; RBAC get pods; its own short timeout).

Everything is blocking (the client is urllib3-based); async callers run these in a thread.
Answers are read into the client's models, which take the fields they know and skip the rest.
"""

from __future__ import annotations

import base64
import functools
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from webhook import names
from webhook.errors import SidemeshError

if TYPE_CHECKING:
    from kubernetes.client import AdmissionregistrationV1Api, AuthenticationV1Api, CoreV1Api

    from webhook.ca.tokenreview import ReviewResult

__all__ = [
    "DEFAULT_TIMEOUT",
    "POD_NAME_EXTRA",
    "TLS_SECRET",
    "KubeAPIError",
    "KubeClient",
    "in_cluster",
]

log = logging.getLogger("sidemesh.kube")

#: The user.extra key under which the API server names the pod a bound token belongs to.
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
#: The serving certificate's Secret (created by ``sidemesh install``, mounted into --cert-dir).
TLS_SECRET = "sidemesh-tls"
#: Seconds a call may take unless the client was given another timeout.
DEFAULT_TIMEOUT = 10.0
_SA_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"

T = TypeVar("T")


class KubeAPIError(SidemeshError):
    """The API server refused a call or could not be reached; ``status`` is 0 for the latter
    (and for a missing or unusable kubeconfig)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


def in_cluster() -> bool:
    """Whether we run in a pod with a service-account token mounted (in-cluster config)."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and os.path.exists(_SA_TOKEN)


class KubeClient:
    """The calls sidemesh makes, over one ``kubernetes.client.ApiClient``. Thread-safe as the
    underlying client is (one urllib3 pool)."""

    def __init__(self, api_client: Any, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.api_client = api_client
        self.timeout = timeout
        """Seconds each call may take (connect and read)."""

    # The client imports each API group (and the models it names) on first use, which costs
    # more than a call: a role builds only the groups it calls.

    @functools.cached_property
    def _core(self) -> CoreV1Api:
        from kubernetes import client

        return client.CoreV1Api(self.api_client)

    @functools.cached_property
    def _admission(self) -> AdmissionregistrationV1Api:
        from kubernetes import client

        return client.AdmissionregistrationV1Api(self.api_client)

    @functools.cached_property
    def _auth(self) -> AuthenticationV1Api:
        from kubernetes import client

        return client.AuthenticationV1Api(self.api_client)

    @functools.cached_property
    def _custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self.api_client)

    # --- connecting ----------------------------------------------------------------------------

    @classmethod
    def at(
        cls,
        host: str,
        *,
        token: str | None = None,
        ca_file: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> KubeClient:
        """An API server at ``host`` (``https://…``), reached directly (no proxy), with a bearer
        ``token`` and the CA in ``ca_file``. TLS verification is always on."""
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = host
        cfg.proxy = None
        if token:
            cfg.api_key = {"BearerToken": token}
            cfg.api_key_prefix = {"BearerToken": "Bearer"}
        cfg.ssl_ca_cert = ca_file
        return cls._with(cfg, timeout)

    @classmethod
    def connect(
        cls,
        *,
        kubeconfig: str | None = None,
        context: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> KubeClient:
        """Configured like kubectl: ``kubeconfig`` (and ``context``) when given; else, in a pod,
        its service account; else ``$KUBECONFIG`` or ``~/.kube/config``.

        A missing or unusable configuration is a :class:`KubeAPIError` saying so."""
        from kubernetes import client, config

        cfg = client.Configuration()
        try:
            if kubeconfig is None and context is None and in_cluster():
                config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
            else:
                config.load_kube_config(  # type: ignore[no-untyped-call]
                    config_file=kubeconfig, context=context, client_configuration=cfg
                )
        except Exception as exc:  # ConfigException, OSError, YAML and key errors of a bad file
            where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
            raise KubeAPIError(0, f"no usable Kubernetes configuration in {where}: {exc}") from None
        return cls._with(cfg, timeout)

    @classmethod
    def _with(cls, cfg: Any, timeout: float) -> KubeClient:
        from kubernetes import client

        cfg.verify_ssl = True
        return cls(client.ApiClient(cfg), timeout=timeout)

    # --- TokenReview -----------------------------------------------------------------------------

    def review_token(
        self, token: str, audiences: tuple[str, ...] = (names.TOKEN_AUDIENCE,)
    ) -> ReviewResult:
        """The API server's verdict on ``token`` (for
        :class:`webhook.ca.tokenreview.TokenReviewVerifier`)."""
        from kubernetes import client

        from webhook.ca.tokenreview import ReviewResult

        body = client.V1TokenReview(
            api_version="authentication.k8s.io/v1",
            kind="TokenReview",
            spec=client.V1TokenReviewSpec(token=token, audiences=list(audiences)),
        )
        answer = self._call(self._auth.create_token_review, body)
        status = answer.status or client.V1TokenReviewStatus()
        user = status.user or client.V1UserInfo()
        pods = (user.extra or {}).get(POD_NAME_EXTRA) or []
        return ReviewResult(
            authenticated=bool(status.authenticated),
            username=str(user.username or ""),
            audiences=tuple(status.audiences or ()),
            pod_name=pods[0] if pods else None,
            error=str(status.error or ""),
        )

    # --- the MutatingWebhookConfiguration's caBundle --------------------------------------------

    def read_ca_bundles(self, name: str = names.WEBHOOK_CONFIGURATION) -> list[str | None]:
        """The decoded ``caBundle`` PEM of each webhook in ``name`` (``None`` where unset)."""
        obj = self._call(self._admission.read_mutating_webhook_configuration, name)
        return [
            base64.b64decode(bundle).decode() if bundle else None
            for bundle in (_ca_bundle(hook) for hook in obj.webhooks or [])
        ]

    def patch_ca_bundle(
        self, bundle_pem: str, name: str = names.WEBHOOK_CONFIGURATION, *, attempts: int = 3
    ) -> int:
        """Set every webhook's ``caBundle`` in ``name`` to ``bundle_pem``; return how many changed.

        A JSON patch guarded by a ``test`` of the resourceVersion: when another replica changed
        the object in between, the patch fails (409/422) and we read again, so a concurrent edit
        of another field is never overwritten. Nothing is sent when every bundle already matches.
        """
        wanted = base64.b64encode(bundle_pem.encode()).decode()
        for attempt in range(attempts):
            obj = self._call(self._admission.read_mutating_webhook_configuration, name)
            ops: list[dict[str, Any]] = [
                {"op": "test", "path": "/metadata/resourceVersion", "value": _version(obj)}
            ]
            for i, hook in enumerate(obj.webhooks or []):
                if hook.client_config is None:
                    ops.append({"op": "add", "path": f"/webhooks/{i}/clientConfig", "value": {}})
                if _ca_bundle(hook) != wanted:
                    path = f"/webhooks/{i}/clientConfig/caBundle"
                    ops.append({"op": "add", "path": path, "value": wanted})
            changed = sum(1 for op in ops if op["path"].endswith("/caBundle"))
            if not changed:
                return 0
            try:
                self._call(
                    self._admission.patch_mutating_webhook_configuration,
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

    # --- custom resources --------------------------------------------------------------------

    def patch_status(
        self, api_version: str, plural: str, namespace: str, name: str, status: dict[str, Any]
    ) -> None:
        """Set ``status`` of a namespaced custom object (a JSON merge patch of the ``status``
        subresource: the spec, and a status field this does not name, stay as they are)."""
        group, _, version = api_version.partition("/")
        self._call(
            self._custom.patch_namespaced_custom_object_status,
            group,
            version,
            namespace,
            plural,
            name,
            {"status": status},
            _content_type="application/merge-patch+json",
        )

    # --- Secrets ---------------------------------------------------------------------------------

    def read_secret(
        self, name: str = TLS_SECRET, namespace: str = names.CONTROL_PLANE_NAMESPACE
    ) -> dict[str, bytes]:
        """The decoded ``data`` of Secret ``namespace/name`` (status 404 when there is none)."""
        return _decoded(self._call(self._core.read_namespaced_secret, name, namespace))

    def update_secret(
        self,
        change: Callable[[dict[str, bytes]], dict[str, bytes] | None],
        name: str = TLS_SECRET,
        namespace: str = names.CONTROL_PLANE_NAMESPACE,
        *,
        attempts: int = 3,
    ) -> bool:
        """Read Secret ``namespace/name``, let ``change(data)`` decide, write its answer back.

        ``change`` returns the keys to set (other keys are kept), or ``None`` for "nothing to
        do". The write is a PUT of the object as read, so it carries that ``resourceVersion``:
        when another replica wrote in between, the API server answers 409 Conflict and we read
        again and ask ``change`` again — which then normally finds the other replica's result
        good enough and returns ``None``. So concurrent writers cannot both win. True when
        written.
        """
        for attempt in range(attempts):
            secret = self._call(self._core.read_namespaced_secret, name, namespace)
            wanted = change(_decoded(secret))
            if wanted is None:
                return False
            data = dict(secret.data or {})
            data.update({k: base64.b64encode(v).decode("ascii") for k, v in wanted.items()})
            secret.data = data
            try:
                self._call(self._core.replace_namespaced_secret, name, namespace, secret)
            except KubeAPIError as exc:
                if exc.status == 409 and attempt + 1 < attempts:
                    log.info(
                        "update of Secret %s/%s raced another writer; re-reading", namespace, name
                    )
                    continue
                raise
            return True
        raise KubeAPIError(
            409, f"Secret {namespace}/{name} kept changing; not updated"
        )  # pragma: no cover

    # --- Pods ----------------------------------------------------------------------------------

    def pod_annotations(self, namespace: str, name: str) -> dict[str, str]:
        """``metadata.annotations`` of Pod ``namespace/name`` (status 404 when there is none).

        Only the metadata is read into a model: the CNI node agent calls this once per sandbox, and
        building the models of a whole Pod (containers, volumes, probes …) the first time costs
        far more than the call itself."""
        import json

        from kubernetes import client

        raw: Any = self._call(  # the HTTP response, not a V1Pod, without preloading
            self._core.read_namespaced_pod, name, namespace, _preload_content=False
        )
        meta = client.V1ObjectMeta.from_dict(json.loads(raw.data).get("metadata") or {})
        annotations = (meta.annotations if meta is not None else None) or {}
        return {str(k): str(v) for k, v in annotations.items()}

    def preload_pods(self) -> None:
        """Import what :meth:`pod_annotations` needs (the core API group and ObjectMeta) now,
        without a request. A caller with a deadline per call — the CNI node agent, whose
        plugin gives up after its timeout — pays that import at start-up instead of in its
        first call, where it costs more than the request itself."""
        from kubernetes.client import V1ObjectMeta  # noqa: F401  (imported for later)

        _ = self._core

    # --- calls -------------------------------------------------------------------------------

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a client call within :attr:`timeout`; every failure becomes a
        :class:`KubeAPIError`."""
        from kubernetes.client.exceptions import ApiException

        try:
            return fn(*args, _request_timeout=self.timeout, **kwargs)
        except ApiException as exc:
            raise KubeAPIError(exc.status or 0, _status_message(exc)) from None
        except OSError as exc:  # refused, TLS failure, timeout (urllib3 wraps in OSError)
            raise KubeAPIError(0, f"cannot reach the API server: {exc}") from None
        except Exception as exc:  # urllib3.exceptions.* that are not OSErrors
            if type(exc).__module__.startswith("urllib3"):
                raise KubeAPIError(0, f"cannot reach the API server: {exc}") from None
            raise


# --- internals -----------------------------------------------------------------------------------


def _status_message(exc: Any) -> str:
    """``"<code> <reason>: <message>"`` from the API server's ``Status`` body."""
    import json

    try:
        body = json.loads(exc.body)
        return f"{exc.status} {body.get('reason', '')}: {body.get('message', '')}".strip()
    except (TypeError, ValueError, AttributeError):
        return f"{exc.status} {exc.reason}"


def _ca_bundle(hook: Any) -> str | None:
    config = hook.client_config
    return config.ca_bundle if config is not None else None


def _version(obj: Any) -> str:
    return str(obj.metadata.resource_version)


def _decoded(secret: Any) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}
