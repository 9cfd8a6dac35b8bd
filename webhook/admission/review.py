"""AdmissionReview in, AdmissionReview out: the admission engine, apart from any web server.

:func:`review` takes the raw request body (bytes) and answers with an :class:`Outcome` that
holds the response review (a dict ready for ``orjson.dumps``) plus what logs and metrics need.
It is pure: the injector is a parameter (the server binds the mesh config and trust bundle
into it), and there is no I/O, clock or randomness here.

The envelope (its wire types, :func:`parse_review` and the HTTP refusals) is
:mod:`webhook.admission.wire`'s; its names are re-exported here.

The answers, first match wins:

| request                                                  | HTTP | answer                      |
|----------------------------------------------------------|------|-----------------------------|
| wrong ``Content-Type``                                   | 415  | ``ReviewError``             |
| body above the limit (checked by the reader)             | 413  | ``ReviewError``             |
| not JSON, not an AdmissionReview, no ``request``/``uid`` | 400  | ``ReviewError``             |
| kind is not core/v1 Pod                                  | 200  | allowed, ``not-a-pod``      |
| a subresource (``pods/exec`` …)                          | 200  | allowed, ``subresource``    |
| operation is not CREATE                                  | 200  | allowed, ``not-create``     |
| ``object`` is not a pod / no namespace anywhere          | 200  | denied, code 400            |
| the core skips (host network, opted out …)               | 200  | allowed, no patch           |
| the core injects                                         | 200  | allowed + JSONPatch         |
| the core raises ``InjectionError`` (bad annotation …)    | 200  | denied, code 400, message   |
| the pod nests values deeper than a patch can encode      | 200  | denied, code 400, too-deep  |
| the core fails unexpectedly (a bug)                      | 200  | denied, code 500            |

Every 200 echoes ``request.uid``; a 4xx carries it too when it could be read. ``dryRun``
changes nothing: the webhook has no side effects (``sideEffects: None``).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import orjson

from webhook.admission.wire import (
    API_VERSIONS,
    AdmissionRequest,
    AdmissionResponse,
    AdmissionReview,
    InvalidReview,
    check_content_type,
    parse_review,
    show,
    too_large,
)
from webhook.errors import AnnotationError, ConflictError, InjectionError

__all__ = [
    "API_VERSIONS",
    "AdmissionRequest",
    "AdmissionResponse",
    "AdmissionReview",
    "Injector",
    "InvalidReview",
    "Outcome",
    "check_content_type",
    "parse_review",
    "review",
    "too_large",
]

#: The API server shows warnings to the user; longer than this they may be cut.
MAX_WARNING = 120
#: The deepest JSON orjson encodes; a patch that copies a deeper pod value is refused.
MAX_PATCH_DEPTH = 255

_TOO_DEEP = (
    f"request.object nests JSON more than {MAX_PATCH_DEPTH} levels deep; sidemesh cannot "
    "encode a patch for it (no Kubernetes field needs such depth)"
)

#: Why a pod was not injected, in words a user understands. Only skips the pod's owner would
#: want to hear about get a warning: hostNetwork is usually a surprise, an opt-out is not.
_WARNINGS = {
    "host-network": "sidemesh: not injected because the pod uses hostNetwork (no sidecar, no mTLS)",
}


# --- the injector seam ------------------------------------------------------------------------


class _Decision(Protocol):
    @property
    def inject(self) -> bool: ...
    @property
    def reason(self) -> str: ...


class _Injection(Protocol):
    @property
    def decision(self) -> _Decision: ...
    @property
    def patch(self) -> list[dict[str, Any]]: ...


#: ``(pod, namespace) -> Injection``: ``inject.inject_pod`` with config and bundle bound.
Injector = Callable[[dict[str, Any], str], _Injection]


@dataclass(frozen=True)
class Outcome:
    """The answer to one review, plus the facts that logs and metrics record."""

    response: AdmissionReview
    uid: str
    result: str
    """Metric label: ``injected``, ``unchanged``, ``skipped`` or ``denied``."""
    reason: str
    """Why: a core decision reason (``host-network`` …), a skip (``not-a-pod`` …) or an error."""
    namespace: str = ""
    pod: str = ""
    operation: str = ""
    dry_run: bool = False
    patch_ops: int = 0
    error: BaseException | None = None
    """An unexpected exception from the injector (a bug): the server logs its traceback."""


# --- answering ---------------------------------------------------------------------------------


class _Envelope(NamedTuple):
    """What every answer to one review repeats from its envelope."""

    api_version: str
    uid: str
    operation: str
    dry_run: bool

    def answer(
        self,
        result: str,
        reason: str,
        response: AdmissionResponse,
        *,
        namespace: str = "",
        pod: str = "",
        patch_ops: int = 0,
        error: BaseException | None = None,
    ) -> Outcome:
        return Outcome(
            response={
                "apiVersion": self.api_version,
                "kind": "AdmissionReview",
                "response": response,
            },
            uid=self.uid,
            result=result,
            reason=reason,
            namespace=namespace,
            pod=pod,
            operation=self.operation,
            dry_run=self.dry_run,
            patch_ops=patch_ops,
            error=error,
        )


def review(
    body: bytes,
    *,
    injector: Injector,
    content_type: str | None = "application/json",
) -> Outcome:
    """Answer one AdmissionReview. Raises :class:`ReviewError` (HTTP 4xx) for a bad envelope."""
    check_content_type(content_type)
    doc = parse_review(body)
    request = doc["request"]  # present: parse_review checked it
    uid = request["uid"]
    operation = request.get("operation") if isinstance(request.get("operation"), str) else ""
    env = _Envelope(doc["apiVersion"], uid, str(operation), request.get("dryRun") is True)

    skip = _not_for_us(request)
    if skip is not None:
        return env.answer("skipped", skip, _allow(uid, "skip", skip))

    pod = request.get("object")
    req_namespace = request.get("namespace")
    req_namespace = req_namespace if isinstance(req_namespace, str) else ""
    if not isinstance(pod, dict):
        return env.answer(
            "denied", "invalid-object", _deny(uid, "request.object is not a Pod object")
        )
    meta = pod.get("metadata")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        return env.answer(
            "denied", "invalid-object", _deny(uid, "request.object.metadata is not an object")
        )
    namespace = meta.get("namespace") or req_namespace
    pod_name = _pod_name(meta, request)
    if not isinstance(namespace, str) or not namespace:
        return env.answer(
            "denied",
            "invalid-object",
            _deny(uid, "no namespace: neither request.namespace nor the pod's metadata has one"),
            pod=pod_name,
        )
    try:
        injection = injector(pod, namespace)
    except Exception as exc:
        reason, response = _refusal(exc, uid)
        # Only a bug in the core carries its exception out: the server logs its traceback.
        error = exc if reason == "internal-error" else None
        return env.answer(
            "denied", reason, response, namespace=namespace, pod=pod_name, error=error
        )
    return _answer_injection(env, injection, namespace, pod_name)


def _refusal(exc: Exception, uid: str) -> tuple[str, AdmissionResponse]:
    """The reason and the denial for an injector that raised ``exc``."""
    if isinstance(exc, AnnotationError):
        return "bad-annotation", _deny(uid, str(exc))
    if isinstance(exc, ConflictError):
        return "conflict", _deny(uid, str(exc))
    if isinstance(exc, InjectionError):
        return "invalid-pod", _deny(uid, str(exc))
    if isinstance(exc, RecursionError):
        return "too-deep", _deny(uid, _TOO_DEEP)
    if isinstance(exc, TypeError | AttributeError | KeyError | ValueError):
        # A pod whose fields have the wrong JSON types (a list where an object belongs) is not
        # a pod the API server would have sent; refuse it with the reason instead of a 500.
        message = f"request.object is not a valid Pod: {type(exc).__name__}: {show(str(exc))}"
        return "invalid-object", _deny(uid, message)
    # A bug in the core: refuse this pod, keep serving, log it.
    message = f"sidemesh could not inject this pod (internal error, review uid {uid})"
    return "internal-error", _deny(uid, message, code=500)


def _answer_injection(
    env: _Envelope, injection: _Injection, namespace: str, pod_name: str
) -> Outcome:
    """Allow the pod: unchanged, skipped (with a warning for some reasons) or patched."""
    uid = env.uid
    decision = injection.decision
    ops = injection.patch
    if not decision.inject:
        response = _allow(uid, "skip", decision.reason)
        warning = _WARNINGS.get(decision.reason)
        if warning:
            response["warnings"] = [warning[:MAX_WARNING]]
        return env.answer("skipped", decision.reason, response, namespace=namespace, pod=pod_name)
    if not ops:
        response = _allow(uid, "unchanged", decision.reason)
        return env.answer("unchanged", decision.reason, response, namespace=namespace, pod=pod_name)
    try:
        encoded = orjson.dumps(ops)
    except orjson.JSONEncodeError:  # orjson stops at 255 levels; the pod's own values do not
        return env.answer(
            "denied", "too-deep", _deny(uid, _TOO_DEEP), namespace=namespace, pod=pod_name
        )
    response = _allow(uid, "inject", decision.reason)
    response["patchType"] = "JSONPatch"
    response["patch"] = base64.b64encode(encoded).decode("ascii")
    return env.answer(
        "injected",
        decision.reason,
        response,
        namespace=namespace,
        pod=pod_name,
        patch_ops=len(ops),
    )


def _not_for_us(request: Mapping[str, Any]) -> str | None:
    """A skip reason for requests that are not a pod being created, else ``None``."""
    kind = request.get("kind")
    if isinstance(kind, dict):
        is_pod = kind.get("group", "") == "" and kind.get("kind") == "Pod"
    else:  # no kind: judge by the resource, as the API server names it
        resource = request.get("resource")
        is_pod = (
            isinstance(resource, dict)
            and resource.get("group", "") == ""
            and resource.get("resource") == "pods"
        )
    if not is_pod:
        return "not-a-pod"
    if request.get("subResource"):
        return "subresource"
    if request.get("operation") != "CREATE":
        return "not-create"
    return None


def _pod_name(meta: Mapping[str, Any], request: Mapping[str, Any]) -> str:
    """The pod's name for logs: pods from controllers carry only ``generateName`` at CREATE."""
    for value in (meta.get("name"), request.get("name"), meta.get("generateName")):
        if isinstance(value, str) and value:
            return value
    return ""


def _allow(uid: str, decision: str, reason: str) -> AdmissionResponse:
    # Audit annotation keys are prefixed by the API server with the webhook's name
    # ("sidemesh-injector.sidemesh.io/decision"), so they must not contain a "/" themselves.
    return {
        "uid": uid,
        "allowed": True,
        "auditAnnotations": {"decision": decision, "reason": reason},
    }


def _deny(uid: str, message: str, *, code: int = 400) -> AdmissionResponse:
    reason = "BadRequest" if code == 400 else "InternalError"
    return {
        "uid": uid,
        "allowed": False,
        "status": {"status": "Failure", "code": code, "reason": reason, "message": message},
    }
