"""Workload identities: SPIFFE ids, and who a service-account token says its bearer is.

A certificate request carries a projected service-account token (audience ``sidemesh-ca``).
A :class:`TokenVerifier` turns it into an :class:`Identity` (namespace + service account) or
refuses it with an :class:`~webhook.errors.IdentityError` whose status and reason go straight
into the HTTP answer and the refusal metric:

============================  ======  =====================================================
reason                        status  when
============================  ======  =====================================================
``invalid-token``             401     not a JWT, unknown key, algorithm not allowed
``bad-signature``             401     the signature does not verify
``token-expired``             401     ``exp`` is in the past (beyond the leeway)
``token-not-yet-valid``       401     ``nbf`` is in the future (beyond the leeway)
``wrong-issuer``              401     ``iss`` is not the configured issuer
``missing-claims``            401     ``sub``/``exp``/``kubernetes.io`` namespace, service
                                      account or pod missing, or disagreeing with ``sub``
``unauthenticated``           401     the API server's TokenReview said no
``wrong-audience``            403     a valid token, but not meant for ``sidemesh-ca``
``not-a-service-account``     403     a valid token of a user that is no service account
``token-review-unavailable``  503     the API server could not be asked
============================  ======  =====================================================

Two verifiers: :class:`JWKSVerifier` checks the token itself against the issuer's public keys
(from a file or a URL; no API call per request), :class:`TokenReviewVerifier` asks the API
server (``TokenReview``), for clusters whose issuer keys are not at hand.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jwt

from webhook import names
from webhook.errors import IdentityError

__all__ = [
    "SERVICE_ACCOUNT_PREFIX",
    "Identity",
    "JWKSVerifier",
    "ReviewResult",
    "TokenReviewVerifier",
    "TokenVerifier",
    "identity_from_username",
    "parse_spiffe_id",
    "spiffe_id",
]

SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"

# DNS-1123 label (namespaces) and subdomain (service accounts): what Kubernetes allows, so a
# SPIFFE path segment can never smuggle a '/' or a '..'.
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")

#: Only asymmetric algorithms: an HMAC or "none" token must never verify against a public key.
_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"}
)


@dataclass(frozen=True)
class Identity:
    """Who a verified token belongs to. Only these fields ever reach a certificate."""

    namespace: str
    service_account: str
    pod_name: str | None = None

    def spiffe_id(self, trust_domain: str) -> str:
        return spiffe_id(trust_domain, self.namespace, self.service_account)


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``."""
    if not _LABEL.match(namespace):
        raise ValueError(f"{namespace!r} is not a Kubernetes namespace name")
    if not _SUBDOMAIN.match(service_account) or ".." in service_account:
        raise ValueError(f"{service_account!r} is not a Kubernetes service account name")
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def parse_spiffe_id(uri: str) -> tuple[str, str, str]:
    """``(trust_domain, namespace, service_account)`` of a sidemesh SPIFFE id."""
    if not uri.startswith("spiffe://"):
        raise ValueError(f"{uri!r} is not a SPIFFE id")
    parts = uri[len("spiffe://") :].split("/")
    if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa" or not parts[0]:
        raise ValueError(f"{uri!r} is not of the form spiffe://<td>/ns/<ns>/sa/<sa>")
    trust_domain, _, namespace, _, service_account = parts
    spiffe_id(trust_domain, namespace, service_account)  # validates the segments
    return trust_domain, namespace, service_account


def identity_from_username(username: str, pod_name: str | None = None) -> Identity:
    """The identity of a Kubernetes user name ``system:serviceaccount:<ns>:<sa>`` (else 403)."""
    if not username.startswith(SERVICE_ACCOUNT_PREFIX):
        raise IdentityError(
            403, "not-a-service-account", f"user {username!r} is not a service account"
        )
    rest = username[len(SERVICE_ACCOUNT_PREFIX) :].split(":")
    if len(rest) != 2 or not _LABEL.match(rest[0]) or not _SUBDOMAIN.match(rest[1]):
        raise IdentityError(
            403, "not-a-service-account", f"user {username!r} is not a service account"
        )
    return Identity(namespace=rest[0], service_account=rest[1], pod_name=pod_name)


class TokenVerifier(Protocol):
    """Turns a bearer token into an :class:`Identity`, or raises :class:`IdentityError`."""

    async def verify(self, token: str) -> Identity: ...


# --- JWKS: the token checks itself ---------------------------------------------------------


class JWKSVerifier:
    """Verifies projected service-account tokens against the issuer's JSON Web Key Set.

    The key set comes from ``jwks`` (a dict), a file or an HTTPS URL (the API server serves
    it at ``/openid/v1/jwks``). A token signed with a key id we do not know triggers one
    reload of the source, at most every ``refresh_seconds``, so issuer key rotation needs no
    restart. ``clock`` is the seam for time (seconds since the epoch).
    """

    def __init__(
        self,
        issuer: str,
        *,
        jwks: Mapping[str, Any] | None = None,
        jwks_file: str | Path | None = None,
        jwks_url: str | None = None,
        url_ca_file: str | Path | None = None,
        audience: str = names.TOKEN_AUDIENCE,
        leeway_seconds: int = 30,
        refresh_seconds: float = 30.0,
        cache_seconds: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if sum(x is not None for x in (jwks, jwks_file, jwks_url)) != 1:
            raise ValueError("give exactly one of jwks, jwks_file, jwks_url")
        self.issuer = issuer
        self.audience = audience
        self._leeway = leeway_seconds
        self._refresh = refresh_seconds
        self._clock = clock
        self._file = Path(jwks_file) if jwks_file is not None else None
        self._url = jwks_url
        self._url_ca_file = url_ca_file
        self._lock = threading.Lock()
        self._loaded_at = float("-inf")
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._cache_seconds = cache_seconds
        # sha256(token) -> (exp, verified at, identity): a proxy presents the same projected
        # token for up to an hour, so a renewal burst checks each signature once.
        self._verified: dict[bytes, tuple[float, float, Identity]] = {}
        if jwks is not None:
            self._keys = _parse_jwks(jwks)
        else:
            self._reload()

    def _reload(self) -> None:
        with self._lock:
            self._loaded_at = time.monotonic()
            if self._file is not None:
                data = json.loads(self._file.read_text(encoding="utf-8"))
            else:
                assert self._url is not None
                ctx = ssl.create_default_context(
                    cafile=str(self._url_ca_file) if self._url_ca_file else None
                )
                with urllib.request.urlopen(self._url, context=ctx, timeout=5) as resp:
                    data = json.loads(resp.read(1 << 20))
            self._keys = _parse_jwks(data)

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        key = self._keys.get(kid)
        if key is None and kid is None and len(self._keys) == 1:
            key = next(iter(self._keys.values()))
        return key

    def _key_for(self, kid: str | None) -> jwt.PyJWK | None:
        key = self._lookup(kid)
        reloadable = self._file is not None or self._url is not None
        if key is None and reloadable and time.monotonic() - self._loaded_at >= self._refresh:
            try:
                self._reload()
            except (OSError, ValueError):
                return None  # keep the old keys; this token stays unknown
            key = self._lookup(kid)
        return key

    async def verify(self, token: str) -> Identity:
        # Pure CPU (one signature check, cheaper than a thread hop): no hop, except when the key set
        # may have to be fetched from a URL again (an unknown key id).
        if self._url is not None:
            try:
                kid = jwt.get_unverified_header(token).get("kid")
            except jwt.PyJWTError:
                kid = None
            if kid not in self._keys:
                return await asyncio.to_thread(self.verify_now, token)
        return self.verify_now(token)

    def verify_now(self, token: str) -> Identity:
        """The synchronous check (benchmarks use it directly)."""
        digest = hashlib.sha256(token.encode()).digest()
        now = self._clock()
        hit = self._verified.get(digest)
        if hit is not None:
            exp, verified_at, identity = hit
            if now <= exp + self._leeway and 0 <= now - verified_at <= self._cache_seconds:
                return identity
            del self._verified[digest]
        identity, exp = self._verify_uncached(token)
        if len(self._verified) >= 10_000:  # bound memory: keep only live entries
            self._verified = {
                k: v for k, v in self._verified.items() if now - v[1] <= self._cache_seconds
            }
            if len(self._verified) >= 10_000:
                self._verified.clear()
        self._verified[digest] = (exp, now, identity)
        return identity

    def _verify_uncached(self, token: str) -> tuple[Identity, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _unauth("invalid-token", "the bearer token is not a JWT") from None
        alg = header.get("alg")
        if alg not in _ALGORITHMS:
            raise _unauth("invalid-token", f"token algorithm {alg!r} is not accepted")
        kid = header.get("kid")
        key = self._key_for(kid if isinstance(kid, str) else None)
        if key is None:
            raise _unauth("invalid-token", "the token was signed by an unknown key")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key.key,
                algorithms=[alg],
                # Time, audience and issuer are checked below with our own clock and reasons.
                options={
                    "verify_signature": True,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise _unauth("bad-signature", "the token's signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise _unauth("invalid-token", f"the token does not decode: {exc}") from None
        return self._check_claims(claims)

    def _check_claims(self, claims: Mapping[str, Any]) -> tuple[Identity, float]:
        now = self._clock()
        if claims.get("iss") != self.issuer:
            raise _unauth("wrong-issuer", "the token was not issued by the configured issuer")
        exp, nbf = _number(claims.get("exp")), _number(claims.get("nbf"))
        if exp is None:
            raise _unauth("missing-claims", "the token has no expiry (exp)")
        if now > exp + self._leeway:
            raise _unauth("token-expired", "the token has expired")
        if "nbf" in claims and (nbf is None or now < nbf - self._leeway):
            raise _unauth("token-not-yet-valid", "the token is not valid yet (nbf)")
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if self.audience not in audiences:
            raise IdentityError(
                403, "wrong-audience", f"the token is not meant for audience {self.audience!r}"
            )
        sub = claims.get("sub")
        if not isinstance(sub, str):
            raise _unauth("missing-claims", "the token has no subject (sub)")
        identity = identity_from_username(sub)
        k8s = claims.get("kubernetes.io")
        namespace = _dig(k8s, "namespace")
        service_account = _dig(k8s, "serviceaccount", "name")
        pod_name = _dig(k8s, "pod", "name")
        if namespace is None or service_account is None or pod_name is None:
            raise _unauth(
                "missing-claims",
                "the token lacks kubernetes.io namespace, serviceaccount or pod claims "
                "(use a projected service-account token)",
            )
        if (namespace, service_account) != (identity.namespace, identity.service_account):
            raise _unauth("missing-claims", "the kubernetes.io claims disagree with sub")
        return Identity(namespace, service_account, pod_name), exp


def _parse_jwks(data: Mapping[str, Any]) -> dict[str | None, jwt.PyJWK]:
    keys: dict[str | None, jwt.PyJWK] = {}
    raw_keys = data.get("keys")
    if not isinstance(raw_keys, list):
        raise ValueError("a JWKS document needs a 'keys' list")
    for raw in raw_keys:
        if not isinstance(raw, dict) or raw.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(raw)
        except jwt.PyJWTError:
            continue  # a key type we cannot use; others may still work
        keys[raw.get("kid")] = key
    if not keys:
        raise ValueError("the JWKS document holds no usable signing key")
    return keys


def _dig(obj: Any, *path: str) -> str | None:
    for step in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(step)
    return obj if isinstance(obj, str) and obj else None


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _unauth(reason: str, message: str) -> IdentityError:
    return IdentityError(401, reason, message)


# --- TokenReview: the API server decides ------------------------------------------------------


@dataclass(frozen=True)
class ReviewResult:
    """What a TokenReview answered (``status`` of the returned object)."""

    authenticated: bool
    username: str = ""
    audiences: tuple[str, ...] = ()
    pod_name: str | None = None
    error: str = ""


class TokenReviewVerifier:
    """Asks the API server whether a token is valid for ``audience`` (``TokenReview``).

    ``review`` is the seam to the API server: a blocking function token → :class:`ReviewResult`
    (:func:`webhook.kube.api.token_reviewer` builds one from the ``kubernetes`` client). It runs
    in a worker thread. Successful answers are cached for ``cache_seconds`` (keyed by the
    token's SHA-256, never the token), so a burst of renewals costs one API call.
    """

    def __init__(
        self,
        review: Callable[[str], ReviewResult],
        *,
        audience: str = names.TOKEN_AUDIENCE,
        cache_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._review = review
        self.audience = audience
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._cache: dict[bytes, tuple[float, Identity]] = {}

    async def verify(self, token: str) -> Identity:
        if not token:
            raise _unauth("invalid-token", "empty bearer token")
        digest = hashlib.sha256(token.encode()).digest()
        now = self._clock()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            result = await asyncio.to_thread(self._review, token)
        except IdentityError:
            raise
        except Exception as exc:
            raise IdentityError(
                503, "token-review-unavailable", f"cannot review the token: {type(exc).__name__}"
            ) from None
        identity = self.decide(result)
        if len(self._cache) > 10_000:  # bound memory: drop expired entries
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
        self._cache[digest] = (now + self._cache_seconds, identity)
        return identity

    def decide(self, result: ReviewResult) -> Identity:
        """The policy on a TokenReview answer (pure)."""
        if not result.authenticated:
            why = f": {result.error}" if result.error else ""
            raise _unauth("unauthenticated", f"the API server did not authenticate the token{why}")
        # An empty audience list means the API server's own default audience: not ours.
        if self.audience not in result.audiences:
            raise IdentityError(
                403, "wrong-audience", f"the token is not meant for audience {self.audience!r}"
            )
        return identity_from_username(result.username, result.pod_name)
