"""``POST /v1/certificates``: workload certificates for authenticated service accounts.

The order of checks is the order of cost and of trust, so that an unauthenticated caller can
never make the CA do more than read a bounded body and check a token:

====  ===========================================================  ==========================
step  check                                                        refusal
====  ===========================================================  ==========================
1     the source address has failed authentication less than       429
      ``ca.unauthenticated_per_address_per_minute`` times          ``rate-limited-address``
2     ``Content-Type: application/json``                           415 ``content-type``
3     body at most ``ca.max_body_bytes`` (header and stream)       413 ``too-large``
4     ``Authorization: Bearer <token>`` present                    401 ``no-token``
5     the token verifies (:mod:`webhook.ca.tokens`)                 401 / 403 / 503
6     this identity is under ``ca.rate_per_identity_per_minute``   429 ``rate-limited``
7     JSON body ``{"csr": PEM, "ttlSeconds": int?}``               400 ``bad-request``
8     TTL within ``[min_ttl_seconds, max_ttl_seconds]``            400 ``ttl-too-long`` …
9     CSR parses, its signature verifies, its key is accepted      400 ``malformed-csr`` …
====  ===========================================================  ==========================

Every refusal of steps 4 and 5 (no valid token) spends one of the source address's budget, so
a client without credentials cannot make the CA check tokens at will. The SPIFFE id comes from
the token alone (step 5); whatever names the CSR carries are ignored.
Signing runs inline on the event loop: it is a short burst of CPU, cheaper than a thread hop.

Metrics (:mod:`webhook.ca.metrics`): ``certificates_issued_total``, ``refusals_total{reason}``,
``signing_seconds`` (CSR parse + verify + sign + PEM). An exception that is none of the typed
refusals is a bug: answered 500 ``internal`` with a fixed message, and reported to
``on_unexpected`` (the server counts it in ``sidemesh_unexpected_errors_total``). Logs name
the SPIFFE id, serial and expiry of each certificate; never a token, a CSR or a key.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypedDict

import orjson
from cryptography import x509
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry

from webhook.ca.authority import (
    CA_KEY,
    CertificateAuthority,
    resolve_ttl,
)
from webhook.ca.limiter import RateLimiter
from webhook.ca.metrics import CAMetrics, metrics_for
from webhook.ca.tokens import TokenVerifier
from webhook.ca.trust import ReloadingTrust
from webhook.ca.verifiers import VERIFIER_ENV, VerifierOptions
from webhook.config import MeshConfig
from webhook.errors import IdentityError, PKIError
from webhook.server.asgi import BodyTooLarge, read_body

__all__ = [
    "VERIFIER_ENV",
    "CertificateRequest",
    "CertificateResponse",
    "VerifierOptions",
    "certificates_router",
    "router_from_config",
]

log = logging.getLogger("sidemesh.ca")

PATH = "/v1/certificates"
_JSON = "application/json"


class CertificateRequest(TypedDict, total=False):
    """The request body. ``csr`` is required."""

    csr: str
    ttlSeconds: int


class CertificateResponse(TypedDict):
    certificateChain: str  # the workload certificate (PEM); the root signs leaves directly
    trustBundle: str  # the mesh root(s), PEM
    expiresAt: str  # RFC 3339, UTC
    spiffeId: str


def _error(
    status: int, reason: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    body = orjson.dumps({"error": reason, "message": message})
    return Response(body, status_code=status, media_type=_JSON, headers=headers)


def certificates_router(
    ca: CertificateAuthority | Callable[[], CertificateAuthority],
    verifier: TokenVerifier,
    *,
    config: MeshConfig,
    registry: CollectorRegistry | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    rate_clock: Callable[[], float] = time.monotonic,
    trust_bundle: Callable[[], str] | None = None,
    on_unexpected: Callable[[], None] = lambda: None,
) -> APIRouter:
    """The ``POST /v1/certificates`` router. ``ca`` is a CA or a function giving the current one.

    ``trust_bundle`` gives the roots answered as ``trustBundle`` (default: the signer's root
    alone); with a rotation under way that is the old and the new root.
    """
    endpoint = _CertificateEndpoint(
        current_ca=ca if callable(ca) else (lambda: ca),
        verifier=verifier,
        config=config,
        metrics=metrics_for(registry),
        clock=clock,
        rate_clock=rate_clock,
        trust_bundle=trust_bundle,
        on_unexpected=on_unexpected,
    )
    router = APIRouter()
    # A plain Starlette route: the handler reads the raw request itself, so FastAPI's
    # dependency and body machinery would only add per-request cost.
    router.add_route(PATH, endpoint.issue, methods=["POST"], include_in_schema=False)
    return router


class _CertificateEndpoint:
    """The steps of the module docstring's table, one method per group of them."""

    def __init__(
        self,
        *,
        current_ca: Callable[[], CertificateAuthority],
        verifier: TokenVerifier,
        config: MeshConfig,
        metrics: CAMetrics,
        clock: Callable[[], datetime],
        rate_clock: Callable[[], float],
        trust_bundle: Callable[[], str] | None,
        on_unexpected: Callable[[], None],
    ) -> None:
        self.current_ca = current_ca
        self.verifier = verifier
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.trust_bundle = trust_bundle
        self.on_unexpected = on_unexpected
        self.limiter = RateLimiter(config.ca.rate_per_identity_per_minute, clock=rate_clock)
        self.failures = RateLimiter(
            config.ca.unauthenticated_per_address_per_minute, clock=rate_clock
        )
        self.limit = config.ca.max_body_bytes

    async def issue(self, request: Request) -> Response:
        try:
            return await self.answer(request)
        except Exception:  # a bug: never a bare 500 page, never the exception's text
            log.exception("unexpected error answering a certificate request")
            self.metrics.refused.labels("internal").inc()
            self.on_unexpected()
            return _error(500, "internal", "the CA could not answer; see its log")

    def refuse(self, exc: IdentityError, who: str = "") -> Response:
        self.metrics.refused.labels(exc.reason).inc()
        log.info(
            "certificate request refused",
            extra={"event": "ca-refused", "reason": exc.reason, "status": exc.status, "id": who},
        )
        return _error(exc.status, exc.reason, str(exc))

    def unauthenticated(self, exc: IdentityError, address: str) -> Response:
        self.failures.allow(address)  # spends one of the address's budget
        return self.refuse(exc)

    async def answer(self, request: Request) -> Response:
        address = request.client.host if request.client is not None else ""
        raw = await self.read(request, address)
        if isinstance(raw, Response):
            return raw
        spiffe_id = await self.authenticate(request, address)
        if isinstance(spiffe_id, Response):
            return spiffe_id
        return self.sign(raw, spiffe_id)

    async def read(self, request: Request, address: str) -> bytes | Response:
        """Steps 1-3: the address's budget, the media type, a bounded body."""
        wait = self.failures.wait(address)
        if wait > 0:
            self.metrics.refused.labels("rate-limited-address").inc()
            return _error(
                429,
                "rate-limited-address",
                f"too many requests without a valid token from {address}; retry in {wait:.0f} s",
                headers={"Retry-After": str(max(1, round(wait)))},
            )
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != _JSON:
            return self.refuse(IdentityError(415, "content-type", "Content-Type must be " + _JSON))
        try:
            raw = await read_body(request.scope, request.receive, self.limit)
        except BodyTooLarge:
            return self.refuse(IdentityError(413, "too-large", f"body above {self.limit} bytes"))
        if raw is None:  # the client went away
            return Response(status_code=400)
        return raw

    async def authenticate(self, request: Request, address: str) -> str | Response:
        """Steps 4-6: the token, the SPIFFE id it proves, that id's rate limit."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return self.unauthenticated(
                IdentityError(
                    401, "no-token", "send Authorization: Bearer <service-account token>"
                ),
                address,
            )
        try:
            identity = await self.verifier.verify(token.strip())
            spiffe_id = identity.spiffe_id(self.config.trust_domain)
        except IdentityError as exc:
            if exc.status in (401, 403):
                return self.unauthenticated(exc, address)
            return self.refuse(exc)
        except ValueError as exc:  # names the SPIFFE format cannot carry
            return self.unauthenticated(IdentityError(403, "bad-identity", str(exc)), address)

        wait = self.limiter.allow(spiffe_id)
        if wait > 0:
            self.metrics.refused.labels("rate-limited").inc()
            log.info(
                "certificate request refused",
                extra={"event": "ca-refused", "reason": "rate-limited", "id": spiffe_id},
            )
            return _error(
                429,
                "rate-limited",
                f"too many requests for {spiffe_id}; retry in {wait:.0f} s",
                headers={"Retry-After": str(max(1, round(wait)))},
            )
        return spiffe_id

    def sign(self, raw: bytes, spiffe_id: str) -> Response:
        """Steps 7-9: the body, the TTL, the CSR; then the certificate, logged and answered."""
        try:
            csr, ttl_seconds = _parse_body(raw)
            ttl = resolve_ttl(ttl_seconds, self.config.ca)
            authority = self.current_ca()
            now = self.clock()
            started = time.perf_counter()
            cert_pem = authority.sign_workload(csr, spiffe_id, now=now, ttl=ttl)
            self.metrics.signing.observe(time.perf_counter() - started)
        except IdentityError as exc:
            return self.refuse(exc, spiffe_id)
        except PKIError as exc:
            log.error("cannot sign", extra={"event": "ca-error", "error": str(exc)})
            self.metrics.refused.labels("ca-unavailable").inc()
            return _error(503, "ca-unavailable", str(exc))
        # X.509 times have whole seconds: say exactly what the certificate says.
        expires_at = min(now + ttl, authority.not_after).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.metrics.issued.inc()
        if log.isEnabledFor(logging.INFO):
            serial = x509.load_pem_x509_certificate(cert_pem.encode()).serial_number
            log.info(
                "certificate issued",
                extra={
                    "event": "ca-issued",
                    "id": spiffe_id,
                    "serial": f"{serial:x}",
                    "expires": expires_at,
                },
            )
        bundle = authority.root_pem if self.trust_bundle is None else self.trust_bundle()
        body: CertificateResponse = {
            "certificateChain": cert_pem,
            "trustBundle": bundle,
            "expiresAt": expires_at,
            "spiffeId": spiffe_id,
        }
        return Response(orjson.dumps(body), media_type=_JSON)


def _parse_body(raw: bytes) -> tuple[str, int | None]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise IdentityError(400, "bad-request", "the body is not JSON") from None
    if not isinstance(body, dict):
        raise IdentityError(400, "bad-request", 'the body must be {"csr": PEM, "ttlSeconds"?}')
    csr = body.get("csr")
    if not isinstance(csr, str) or not csr:
        raise IdentityError(400, "bad-request", "csr (a PEM certificate request) is required")
    ttl = body.get("ttlSeconds")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int)):
        raise IdentityError(400, "bad-ttl", "ttlSeconds must be an integer")
    return csr, ttl


def router_from_config(
    config: MeshConfig,
    cert_dir: Path,
    verifier: TokenVerifier | VerifierOptions | None = None,
    *,
    registry: CollectorRegistry | None = None,
    trust: ReloadingTrust | None = None,
    on_unexpected: Callable[[], None] = lambda: None,
) -> APIRouter | None:
    """The CA router when ``cert_dir`` holds the root key and a verifier is configured.

    ``verifier`` may be a ready verifier, :class:`VerifierOptions` (from the server's flags),
    or ``None`` for :meth:`VerifierOptions.from_env`. ``trust`` is the server's reloading view
    of ``ca.crt``/``ca.key`` (shared with the bundle it injects); by default one of its own.
    """
    cert_dir = Path(cert_dir)
    if not (cert_dir / CA_KEY).exists():
        log.info("no %s in %s: not serving %s", CA_KEY, cert_dir, PATH)
        return None
    if verifier is None:
        verifier = VerifierOptions.from_env()
    if isinstance(verifier, VerifierOptions):
        built = verifier.build(max_token_lifetime_seconds=config.ca.max_token_lifetime_seconds)
        if built is None:
            log.warning(
                "no token verifier configured (--jwks-file/--jwks-url or TokenReview): "
                "not serving %s",
                PATH,
            )
            return None
        verifier = built
    if trust is None or not trust.with_key:
        # Loads now: broken files fail at start-up, not on the first request.
        trust = ReloadingTrust(cert_dir, with_key=True)
    return certificates_router(
        trust.authority,
        verifier,
        config=config,
        registry=registry,
        trust_bundle=trust.bundle,
        on_unexpected=on_unexpected,
    )
