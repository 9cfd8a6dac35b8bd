"""AdmissionReview in, AdmissionReview out: the admission engine, apart from any web server.

:func:`review` takes the raw request body (bytes) and answers with an :class:`Outcome` that
holds the response review (a dict ready for ``orjson.dumps``) plus what logs and metrics need.
It is pure: the injector is a parameter (the server binds the mesh config and trust bundle
into it), and there is no I/O, clock or randomness here.

The body is parsed with orjson into plain dicts and checked by hand rather than through a
validating model: the pod must round-trip untouched, and FastAPI's ``Body(dict)`` parsing
cost a large share of the webhook's throughput. The TypedDicts below document (and
type-check) the wire format of ``admission.k8s.io/v1`` and ``v1beta1``, which are identical
in shape for everything this webhook reads and writes.

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
from typing import Any, Literal, NotRequired, Protocol, TypedDict

import orjson

from webhook.errors import AnnotationError, ConflictError, InjectionError, ReviewError

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

API_VERSIONS = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")
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


# --- the wire format ------------------------------------------------------------------------


class GroupVersionKind(TypedDict):
    group: str
    version: str
    kind: str


class GroupVersionResource(TypedDict):
    group: str
    version: str
    resource: str


class AdmissionRequest(TypedDict):
    uid: str
    kind: GroupVersionKind
    resource: GroupVersionResource
    subResource: NotRequired[str]
    name: NotRequired[str]
    namespace: NotRequired[str]
    operation: str  # CREATE | UPDATE | DELETE | CONNECT
    object: NotRequired[dict[str, Any] | None]
    oldObject: NotRequired[dict[str, Any] | None]
    dryRun: NotRequired[bool]


class Status(TypedDict):
    status: Literal["Failure"]
    code: int
    reason: str
    message: str


class AdmissionResponse(TypedDict):
    uid: str
    allowed: bool
    patchType: NotRequired[Literal["JSONPatch"]]
    patch: NotRequired[str]  # base64 of the RFC 6902 JSON
    status: NotRequired[Status]
    auditAnnotations: NotRequired[dict[str, str]]
    warnings: NotRequired[list[str]]


class AdmissionReview(TypedDict):
    apiVersion: str
    kind: Literal["AdmissionReview"]
    request: NotRequired[AdmissionRequest]
    response: NotRequired[AdmissionResponse]


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


class InvalidReview(ReviewError):
    """A request that is not an AdmissionReview: answered with HTTP ``status``, not a review.

    ``reason`` is the metric label; ``uid`` is set when the request's uid could still be read,
    so that even this answer names the review it refuses.
    """

    def __init__(self, status: int, reason: str, message: str, uid: str = "") -> None:
        super().__init__(status, message)
        self.reason = reason
        self.uid = uid


# --- parsing ------------------------------------------------------------------------------------


def check_content_type(content_type: str | None) -> None:
    """The API server sends ``application/json``; anything else is a 415."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        shown = content_type or "none"
        raise InvalidReview(
            415, "content-type", f"Content-Type must be application/json, got {shown}"
        )


def parse_review(body: bytes) -> AdmissionReview:
    """Check the envelope of a review: JSON object, apiVersion, kind, request, uid.

    The body's size is the reader's business (:func:`webhook.admission.endpoint.read_body`).
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidReview(400, "not-json", f"body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidReview(
            400, "not-a-review", f"body must be a JSON object, got {type(doc).__name__}"
        )
    request = doc.get("request")
    uid = request.get("uid") if isinstance(request, dict) else None
    uid = uid if isinstance(uid, str) else ""
    api_version = doc.get("apiVersion")
    kind = doc.get("kind")
    if kind != "AdmissionReview":
        raise InvalidReview(
            400, "not-a-review", f"kind must be AdmissionReview, got {_show(kind)}", uid
        )
    if api_version not in API_VERSIONS:
        message = f"apiVersion must be one of {', '.join(API_VERSIONS)}, got {_show(api_version)}"
        raise InvalidReview(400, "api-version", message, uid)
    if not isinstance(request, dict):
        why = "missing" if request is None else f"a {type(request).__name__}, not an object"
        raise InvalidReview(400, "no-request", f"AdmissionReview.request is {why}")
    if not uid:
        raise InvalidReview(
            400, "no-uid", "AdmissionReview.request.uid is missing or not a non-empty string"
        )
    return doc  # type: ignore[return-value]


def too_large(size: int, limit: int) -> InvalidReview:
    return InvalidReview(413, "too-large", f"AdmissionReview is {size} bytes, limit {limit}")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- answering ---------------------------------------------------------------------------------


def review(
    body: bytes,
    *,
    injector: Injector,
    content_type: str | None = "application/json",
) -> Outcome:
    """Answer one AdmissionReview. Raises :class:`ReviewError` (HTTP 4xx) for a bad envelope."""
    check_content_type(content_type)
    doc = parse_review(body)
    api_version = doc["apiVersion"]
    request = doc["request"]  # present: parse_review checked it
    uid = request["uid"]
    operation = request.get("operation") if isinstance(request.get("operation"), str) else ""
    dry_run = request.get("dryRun") is True

    def answer(
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
            response={"apiVersion": api_version, "kind": "AdmissionReview", "response": response},
            uid=uid,
            result=result,
            reason=reason,
            namespace=namespace,
            pod=pod,
            operation=str(operation),
            dry_run=dry_run,
            patch_ops=patch_ops,
            error=error,
        )

    skip = _not_for_us(request)
    if skip is not None:
        return answer("skipped", skip, _allow(uid, "skip", skip))

    pod = request.get("object")
    req_namespace = request.get("namespace")
    req_namespace = req_namespace if isinstance(req_namespace, str) else ""
    if not isinstance(pod, dict):
        return answer("denied", "invalid-object", _deny(uid, "request.object is not a Pod object"))
    meta = pod.get("metadata")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        return answer(
            "denied", "invalid-object", _deny(uid, "request.object.metadata is not an object")
        )
    namespace = meta.get("namespace") or req_namespace
    pod_name = _pod_name(meta, request)
    if not isinstance(namespace, str) or not namespace:
        return answer(
            "denied",
            "invalid-object",
            _deny(uid, "no namespace: neither request.namespace nor the pod's metadata has one"),
            pod=pod_name,
        )
    try:
        injection = injector(pod, namespace)
    except AnnotationError as exc:
        return answer(
            "denied", "bad-annotation", _deny(uid, str(exc)), namespace=namespace, pod=pod_name
        )
    except ConflictError as exc:
        return answer("denied", "conflict", _deny(uid, str(exc)), namespace=namespace, pod=pod_name)
    except InjectionError as exc:
        return answer(
            "denied", "invalid-pod", _deny(uid, str(exc)), namespace=namespace, pod=pod_name
        )
    except RecursionError:
        return answer(
            "denied", "too-deep", _deny(uid, _TOO_DEEP), namespace=namespace, pod=pod_name
        )
    except (TypeError, AttributeError, KeyError, ValueError) as exc:
        # A pod whose fields have the wrong JSON types (a list where an object belongs) is not
        # a pod the API server would have sent; refuse it with the reason instead of a 500.
        message = f"request.object is not a valid Pod: {type(exc).__name__}: {_show(str(exc))}"
        return answer(
            "denied", "invalid-object", _deny(uid, message), namespace=namespace, pod=pod_name
        )
    except Exception as exc:  # a bug in the core: refuse this pod, keep serving, log it
        message = f"sidemesh could not inject this pod (internal error, review uid {uid})"
        return answer(
            "denied",
            "internal-error",
            _deny(uid, message, code=500),
            namespace=namespace,
            pod=pod_name,
            error=exc,
        )

    decision = injection.decision
    ops = injection.patch
    if not decision.inject:
        response = _allow(uid, "skip", decision.reason)
        warning = _WARNINGS.get(decision.reason)
        if warning:
            response["warnings"] = [warning[:MAX_WARNING]]
        return answer("skipped", decision.reason, response, namespace=namespace, pod=pod_name)
    if not ops:
        response = _allow(uid, "unchanged", decision.reason)
        return answer("unchanged", decision.reason, response, namespace=namespace, pod=pod_name)
    try:
        encoded = orjson.dumps(ops)
    except orjson.JSONEncodeError:  # orjson stops at 255 levels; the pod's own values do not
        return answer(
            "denied", "too-deep", _deny(uid, _TOO_DEEP), namespace=namespace, pod=pod_name
        )
    response = _allow(uid, "inject", decision.reason)
    response["patchType"] = "JSONPatch"
    response["patch"] = base64.b64encode(encoded).decode("ascii")
    return answer(
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
