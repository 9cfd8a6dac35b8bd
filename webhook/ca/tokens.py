"""Workload identities: SPIFFE ids, and who a service-account token says its bearer is.

A certificate request carries a projected service-account token (audience ``sidemesh-ca``).
A :class:`TokenVerifier` turns it into an :class:`Identity` (namespace + service account) or
refuses it with an :class:`~webhook.errors.IdentityError` whose status and reason go straight
into the HTTP answer and the refusal metric:

============================  ======  =====================================================
reason                        status  when
============================  ======  =====================================================
``invalid-token``             401     not a JWT, unknown key, algorithm not allowed or not
                                      the algorithm of the key its ``kid`` names
``bad-signature``             401     the signature does not verify
``token-expired``             401     ``exp`` is in the past (beyond the leeway)
``token-not-yet-valid``       401     ``nbf`` or ``iat`` is in the future (beyond the leeway)
``token-lifetime-too-long``   401     ``exp`` lies more than the lifetime cap after ``iat``
``wrong-issuer``              401     ``iss`` is not the configured issuer
``missing-claims``            401     ``sub``/``exp``/``iat``/``kubernetes.io`` namespace,
                                      service account or pod missing, or disagreeing with
                                      ``sub``
``unauthenticated``           401     the API server's TokenReview said no
``wrong-audience``            403     a valid token, but not meant for ``sidemesh-ca``
``not-a-service-account``     403     a valid token of a user that is no service account
``token-review-unavailable``  503     the API server could not be asked
============================  ======  =====================================================

Two verifiers: :class:`JWKSVerifier` checks the token itself against the issuer's public keys
(from a file or a URL; no API call per request) with PyJWT's own signature and claim checks;
:class:`~webhook.ca.tokenreview.TokenReviewVerifier` asks the API server (``TokenReview``), for
clusters whose issuer keys are not at hand.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import ssl
import threading
import time
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
    "TokenVerifier",
    "identity_from_username",
    "parse_spiffe_id",
    "spiffe_id",
]

SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"

# DNS-1123 label (namespaces) and subdomain (service accounts): what Kubernetes allows, so a
# SPIFFE path segment can never smuggle a '/' or a '..'. Always used with ``fullmatch``: ``$``
# also matches before a trailing newline, which would put a newline into a URI SAN.
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")

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
    if not _LABEL.fullmatch(namespace):
        raise ValueError(f"{namespace!r} is not a Kubernetes namespace name")
    if not _SUBDOMAIN.fullmatch(service_account) or ".." in service_account:
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
    if len(rest) != 2 or not _LABEL.fullmatch(rest[0]) or not _SUBDOMAIN.fullmatch(rest[1]):
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
    it at ``/openid/v1/jwks``, fetched with PyJWT's :class:`jwt.PyJWKClient`). A token signed
    with a key id we do not know triggers one reload of the source, at most every
    ``refresh_seconds``, so issuer key rotation needs no restart and unauthenticated callers
    cannot make the CA fetch the key set at will.

    Signature, ``exp``, ``nbf``, ``iat``, ``aud`` and ``iss`` are checked by PyJWT (with
    ``leeway_seconds`` of clock skew); this class adds what PyJWT leaves to its caller: the
    header ``alg`` must be the algorithm of the key its ``kid`` names, the lifetime
    ``exp - iat`` is capped at ``max_lifetime_seconds``, and the Kubernetes claims must agree
    with ``sub``. ``clock`` (seconds since the epoch) is the seam for the verified-token cache.
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
        max_lifetime_seconds: int = 86400,
        refresh_seconds: float = 30.0,
        cache_seconds: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if sum(x is not None for x in (jwks, jwks_file, jwks_url)) != 1:
            raise ValueError("give exactly one of jwks, jwks_file, jwks_url")
        self.issuer = issuer
        self.audience = audience
        self._leeway = leeway_seconds
        self._max_lifetime = max_lifetime_seconds
        self._refresh = refresh_seconds
        self._clock = clock
        self._file = Path(jwks_file) if jwks_file is not None else None
        self._client: jwt.PyJWKClient | None = None
        if jwks_url is not None:
            ctx = ssl.create_default_context(cafile=str(url_ca_file) if url_ca_file else None)
            self._client = jwt.PyJWKClient(
                jwks_url, cache_jwk_set=False, cache_keys=False, timeout=5, ssl_context=ctx
            )
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
                assert self._client is not None
                data = self._client.fetch_data()
            self._keys = _parse_jwks(data)

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        key = self._keys.get(kid)
        if key is None and kid is None and len(self._keys) == 1:
            key = next(iter(self._keys.values()))
        return key

    def _key_for(self, kid: str | None) -> jwt.PyJWK | None:
        key = self._lookup(kid)
        reloadable = self._file is not None or self._client is not None
        if key is None and reloadable and time.monotonic() - self._loaded_at >= self._refresh:
            try:
                self._reload()
            except (OSError, ValueError, jwt.PyJWTError):
                return None  # keep the old keys; this token stays unknown
            key = self._lookup(kid)
        return key

    async def verify(self, token: str) -> Identity:
        # Pure CPU (one signature check, cheaper than a thread hop): no hop, except when the
        # key set may have to be fetched from a URL again (an unknown key id).
        if self._client is not None:
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
            if now > exp + self._leeway:
                raise _unauth("token-expired", "the token has expired")
            if 0 <= now - verified_at <= self._cache_seconds:
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
            raise _unauth("invalid-token", f"token algorithm {_short(alg)} is not accepted")
        kid = header.get("kid")
        key = self._key_for(kid if isinstance(kid, str) else None)
        if key is None:
            raise _unauth("invalid-token", "the token was signed by an unknown key")
        if alg != key.algorithm_name:
            # The key decides the algorithm, never the token. Checked before PyJWT sees the
            # pair: an EC algorithm over an RSA key raises a TypeError inside PyJWT.
            raise _unauth("invalid-token", f"algorithm {alg} does not fit the key {_short(kid)}")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key.key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self._leeway,
                options={"require": ["exp", "iat", "sub"], "verify_sub": False},
            )
        except jwt.PyJWTError as exc:
            raise _refusal(exc) from None
        except (TypeError, ValueError):  # a key/algorithm pair PyJWT did not expect
            raise _unauth("invalid-token", "the token does not decode") from None
        return self._check_claims(claims)

    def _check_claims(self, claims: Mapping[str, Any]) -> tuple[Identity, float]:
        exp, iat = float(claims["exp"]), float(claims["iat"])  # PyJWT checked both are numbers
        if exp - iat > self._max_lifetime:
            raise _unauth(
                "token-lifetime-too-long",
                f"the token lives {exp - iat:.0f} s, more than {self._max_lifetime} s",
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


def _refusal(exc: jwt.PyJWTError) -> IdentityError:
    """PyJWT's verdict as one of our reasons (the messages are ours: no library text echoed)."""
    if isinstance(exc, jwt.InvalidSignatureError):
        return _unauth("bad-signature", "the token's signature does not verify")
    if isinstance(exc, jwt.ExpiredSignatureError):
        return _unauth("token-expired", "the token has expired")
    if isinstance(exc, jwt.ImmatureSignatureError):
        return _unauth("token-not-yet-valid", "the token is not valid yet (nbf or iat)")
    if isinstance(exc, jwt.InvalidAudienceError):
        return IdentityError(403, "wrong-audience", "the token is not meant for this audience")
    if isinstance(exc, jwt.InvalidIssuerError):
        return _unauth("wrong-issuer", "the token was not issued by the configured issuer")
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return _unauth("missing-claims", f"the token has no {exc.claim!r} claim")
    return _unauth("invalid-token", "the token does not decode")


def _parse_jwks(data: Any) -> dict[str | None, jwt.PyJWK]:
    if not isinstance(data, Mapping) or not isinstance(data.get("keys"), list):
        raise ValueError("a JWKS document needs a 'keys' list")
    signing = [k for k in data["keys"] if isinstance(k, dict) and k.get("use", "sig") == "sig"]
    try:
        key_set = jwt.PyJWKSet(signing)  # skips key types it cannot use
    except jwt.PyJWTError:
        raise ValueError("the JWKS document holds no usable signing key") from None
    # A key's own algorithm is its JWK ``alg``, or what PyJWT infers from ``kty``/``crv``.
    keys = {jwk.key_id: jwk for jwk in key_set if jwk.algorithm_name in _ALGORITHMS}
    if not keys:
        raise ValueError("the JWKS document holds no usable signing key")
    return keys


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _dig(obj: Any, *path: str) -> str | None:
    for step in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(step)
    return obj if isinstance(obj, str) and obj else None


def _unauth(reason: str, message: str) -> IdentityError:
    return IdentityError(401, reason, message)
