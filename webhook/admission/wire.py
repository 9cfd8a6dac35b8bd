"""The AdmissionReview envelope: its wire types and the checks before any answer. Pure.

The body is parsed with orjson into plain dicts and checked by hand rather than through a
validating model: the pod must round-trip untouched, and FastAPI's ``Body(dict)`` parsing
cost a large share of the webhook's throughput. The TypedDicts below document (and
type-check) the wire format of ``admission.k8s.io/v1`` and ``v1beta1``, which are identical
in shape for everything this webhook reads and writes. A request that is no review at all is
refused with an HTTP status (:class:`InvalidReview`); the rest is :mod:`webhook.admission.review`'s.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

import orjson

from webhook.errors import ReviewError

__all__ = [
    "API_VERSIONS",
    "AdmissionRequest",
    "AdmissionResponse",
    "AdmissionReview",
    "InvalidReview",
    "Status",
    "check_content_type",
    "parse_review",
    "show",
    "too_large",
]

API_VERSIONS = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")

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
            400, "not-a-review", f"kind must be AdmissionReview, got {show(kind)}", uid
        )
    if api_version not in API_VERSIONS:
        message = f"apiVersion must be one of {', '.join(API_VERSIONS)}, got {show(api_version)}"
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


def show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
