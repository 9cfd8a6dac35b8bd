"""The one small hierarchy of sidemesh errors.

Two channels reach the user: a malformed *request* (an AdmissionReview that is not one, a CSR
that does not parse) is answered with an HTTP 4xx; a *pod* that cannot be injected is answered
with ``allowed: false`` and a message naming the field and the value. Everything below derives
from :class:`SidemeshError`, so an edge can catch one type and never leak a traceback::

    SidemeshError
    ├── ConfigError          bad mesh config: names the key and the value (fails at start-up)
    ├── InjectionError       this pod cannot be injected (→ allowed: false, code 400)
    │   ├── AnnotationError  a per-pod annotation has a bad value (names annotation + value)
    │   └── ConflictError    the pod already has a container/volume named like ours, or uses
    │                        a reserved port or the proxy uid
    ├── ManifestError        an input document cannot be read (names the document index, line)
    ├── ReviewError          a malformed AdmissionReview (→ HTTP 4xx; carries the status code)
    ├── IdentityError        a certificate request is refused (→ HTTP 4xx; carries the code)
    ├── PKIError             the CA's files are missing, unreadable or do not belong together
    └── TrafficError         capture rules cannot be applied (iptables missing, no NET_ADMIN,
                             refusing the host's network namespace)
"""

from __future__ import annotations

__all__ = [
    "AnnotationError",
    "ConfigError",
    "ConflictError",
    "IdentityError",
    "InjectionError",
    "ManifestError",
    "PKIError",
    "ReviewError",
    "SidemeshError",
    "TrafficError",
]


class SidemeshError(Exception):
    """Base of every error sidemesh raises on purpose."""


class ConfigError(SidemeshError):
    """The mesh config has an unknown key or a bad value."""


class InjectionError(SidemeshError):
    """The pod cannot be injected; the message is shown to the user as is."""


class AnnotationError(InjectionError):
    """A per-pod annotation or label has a value sidemesh cannot use."""

    def __init__(self, name: str, value: str, why: str, *, kind: str = "annotation") -> None:
        self.name = name
        self.value = value
        self.why = why
        self.kind = kind  # "annotation" or "label"
        super().__init__(f"{kind} {name}={value!r}: {why}")


class ConflictError(InjectionError):
    """The pod collides with what sidemesh would add (names, reserved ports, proxy uid)."""


class ManifestError(SidemeshError):
    """An input document cannot be read or is not a Kubernetes object."""


class ReviewError(SidemeshError):
    """A malformed AdmissionReview; ``status`` is the HTTP status code to answer with."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


class IdentityError(SidemeshError):
    """A refused certificate request; ``status`` is the HTTP code, ``reason`` a metric label."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(message)


class PKIError(SidemeshError):
    """The CA's files are missing, unreadable or inconsistent, or a certificate cannot be made."""


class TrafficError(SidemeshError):
    """Traffic capture cannot be set up or removed."""
