"""Token verification: the JWKS verifier's table of good and bad tokens, and SPIFFE ids."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import jwt
import pytest

from tests.support.jwks_issuer import Issuer
from webhook.ca.tokenreview import ReviewResult, TokenReviewVerifier
from webhook.ca.tokens import (
    Identity,
    JWKSVerifier,
    identity_from_username,
    parse_spiffe_id,
    spiffe_id,
)
from webhook.errors import IdentityError

#: "Now" for the tokens a test mints: PyJWT checks them against the real clock, so NOW is set
#: afresh for every test (module import can be minutes before a test runs in the full suite).
NOW = float(int(time.time()))


@pytest.fixture(autouse=True)
def _fresh_now() -> None:
    global NOW
    NOW = float(int(time.time()))


@pytest.fixture(scope="module")
def verifier(issuer: Issuer) -> JWKSVerifier:
    return JWKSVerifier(issuer.issuer_url, jwks=issuer.jwks(), clock=lambda: NOW)


def check(verifier: JWKSVerifier, token: str) -> Identity:
    return asyncio.run(verifier.verify(token))


def test_a_projected_token_gives_namespace_service_account_and_pod(
    issuer: Issuer, verifier: JWKSVerifier
) -> None:
    token = issuer.token("shop", "cart", "cart-5f7-x2x", now=NOW)
    assert check(verifier, token) == Identity("shop", "cart", "cart-5f7-x2x")


def _forged_signature(issuer: Issuer) -> str:
    other = Issuer.create(issuer.issuer_url, kid=issuer.kid)  # same kid, other key
    return other.token("shop", "cart", now=NOW)


def _hmac_with_public_key(issuer: Issuer) -> str:
    claims = issuer.claims("shop", "cart", "p", now=NOW)
    return jwt.encode(claims, "s" * 32, algorithm="HS256", headers={"kid": issuer.kid})


def _es256_header_over_rsa_key(issuer: Issuer) -> str:
    """An ES256 token whose kid names the issuer's RSA key: PyJWT raised TypeError on it."""
    other = Issuer.create(issuer.issuer_url, algorithm="ES256", kid=issuer.kid)
    return other.token("shop", "cart", now=NOW)


def _with_name(issuer: Issuer, service_account: str, namespace: str = "shop") -> str:
    """A correctly signed token for a name Kubernetes never issues (``$`` matched it)."""
    return issuer.token(
        namespace,
        service_account,
        now=NOW,
        subject=f"system:serviceaccount:{namespace}:{service_account}",
    )


# (name, build token, expected status, expected reason)
CASES = [
    ("expired", lambda i: i.token("shop", "cart", now=NOW - 7200, ttl=3600), 401, "token-expired"),
    (
        "not-yet-valid",
        lambda i: i.token("shop", "cart", now=NOW, not_before=NOW + 600),
        401,
        "token-not-yet-valid",
    ),
    (
        "wrong-audience",
        lambda i: i.token("shop", "cart", audience="https://kubernetes.default.svc", now=NOW),
        403,
        "wrong-audience",
    ),
    (
        "wrong-issuer",
        lambda i: i.token("shop", "cart", issuer="https://evil.example", now=NOW),
        401,
        "wrong-issuer",
    ),
    ("bad-signature", _forged_signature, 401, "bad-signature"),
    ("hmac-alg", _hmac_with_public_key, 401, "invalid-token"),
    (
        "unknown-key",
        lambda i: Issuer.create(i.issuer_url).token("shop", "cart", now=NOW),
        401,
        "invalid-token",
    ),
    (
        "missing-exp",
        lambda i: i.token("shop", "cart", now=NOW, drop=("exp",)),
        401,
        "missing-claims",
    ),
    (
        "missing-sub",
        lambda i: i.token("shop", "cart", now=NOW, drop=("sub",)),
        401,
        "missing-claims",
    ),
    (
        "missing-k8s",
        lambda i: i.token("shop", "cart", now=NOW, drop=("kubernetes.io",)),
        401,
        "missing-claims",
    ),
    (
        "missing-pod",
        lambda i: i.token(
            "shop",
            "cart",
            now=NOW,
            extra={"kubernetes.io": {"namespace": "shop", "serviceaccount": {"name": "cart"}}},
        ),
        401,
        "missing-claims",
    ),
    (
        "claims-disagree-with-sub",
        lambda i: i.token(
            "shop", "cart", now=NOW, subject="system:serviceaccount:kube-system:admin"
        ),
        401,
        "missing-claims",
    ),
    (
        "user-not-service-account",
        lambda i: i.token("shop", "cart", now=NOW, subject="jane@example.com"),
        403,
        "not-a-service-account",
    ),
    (
        "iat-in-the-future",
        lambda i: i.token("shop", "cart", now=NOW, extra={"iat": int(NOW) + 3600}),
        401,
        "token-not-yet-valid",
    ),
    (
        "exp-1e300",
        lambda i: i.token("shop", "cart", now=NOW, extra={"exp": 1e300}),
        401,
        "token-lifetime-too-long",
    ),
    (
        "lifetime-above-the-cap",
        lambda i: i.token("shop", "cart", now=NOW, ttl=86400 + 60),
        401,
        "token-lifetime-too-long",
    ),
    (
        "missing-iat",
        lambda i: i.token("shop", "cart", now=NOW, drop=("iat",)),
        401,
        "missing-claims",
    ),
    ("es256-header-rsa-key", _es256_header_over_rsa_key, 401, "invalid-token"),
    ("trailing-newline-sa", lambda i: _with_name(i, "cart\n"), 403, "not-a-service-account"),
    (
        "trailing-newline-ns",
        lambda i: _with_name(i, "cart", "shop\n"),
        403,
        "not-a-service-account",
    ),
    ("not-a-jwt", lambda i: "hello.world", 401, "invalid-token"),
    ("empty", lambda i: "", 401, "invalid-token"),
]


@pytest.mark.parametrize(("name", "build", "status", "reason"), CASES, ids=[c[0] for c in CASES])
def test_bad_tokens_are_refused_with_a_reason(
    issuer: Issuer, verifier: JWKSVerifier, name: str, build: object, status: int, reason: str
) -> None:
    token = build(issuer)  # type: ignore[operator]
    with pytest.raises(IdentityError) as err:
        check(verifier, token)
    assert (err.value.status, err.value.reason) == (status, reason), str(err.value)


def test_leeway_tolerates_small_clock_skew(issuer: Issuer, verifier: JWKSVerifier) -> None:
    # PyJWT checks time with the real clock: expired 10 s before this moment.
    token = issuer.token("shop", "cart", now=time.time() - 3610, ttl=3600)
    assert check(verifier, token).namespace == "shop"


def test_es256_issuer(verifier: JWKSVerifier) -> None:
    es = Issuer.create(algorithm="ES256")
    v = JWKSVerifier(es.issuer_url, jwks=es.jwks(), clock=lambda: NOW)
    assert check(v, es.token("a", "b", now=NOW)) == Identity("a", "b", "pod-0")


def test_jwks_file_is_reloaded_when_the_issuer_rotates_its_key(tmp_path: Path) -> None:
    old, new = Issuer.create(kid="old"), Issuer.create(kid="new")
    path = old.write_jwks(tmp_path / "jwks.json")
    v = JWKSVerifier(old.issuer_url, jwks_file=path, refresh_seconds=0)
    assert check(v, old.token("a", "b")).service_account == "b"
    both = {"keys": old.jwks()["keys"] + new.jwks()["keys"]}
    path.write_text(json.dumps(both))
    assert check(v, new.token("a", "c")).service_account == "c"


def test_jwks_without_usable_keys_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text('{"keys": []}')
    with pytest.raises(ValueError, match="no usable"):
        JWKSVerifier("x", jwks_file=path)


# --- TokenReview policy (the API calls themselves: test_kubeapi_standin.py) ----------------


def _reviewer(result: ReviewResult, calls: list[str]) -> TokenReviewVerifier:
    def review(token: str) -> ReviewResult:
        calls.append(token)
        return result

    return TokenReviewVerifier(review)


def test_token_review_answer_decides_and_is_cached() -> None:
    calls: list[str] = []
    ok = ReviewResult(True, "system:serviceaccount:shop:cart", ("sidemesh-ca",), "cart-1")
    v = _reviewer(ok, calls)
    assert asyncio.run(v.verify("t1")) == Identity("shop", "cart", "cart-1")
    assert asyncio.run(v.verify("t1")) == Identity("shop", "cart", "cart-1")
    assert calls == ["t1"]


@pytest.mark.parametrize(
    ("result", "status", "reason"),
    [
        (ReviewResult(False, error="token expired"), 401, "unauthenticated"),
        (
            ReviewResult(True, "system:serviceaccount:a:b", ("https://kubernetes.default.svc",)),
            403,
            "wrong-audience",
        ),
        (ReviewResult(True, "system:serviceaccount:a:b", ()), 403, "wrong-audience"),
        (ReviewResult(True, "admin", ("sidemesh-ca",)), 403, "not-a-service-account"),
        (ReviewResult(True, "system:node:n1", ("sidemesh-ca",)), 403, "not-a-service-account"),
    ],
)
def test_token_review_refusals(result: ReviewResult, status: int, reason: str) -> None:
    with pytest.raises(IdentityError) as err:
        asyncio.run(_reviewer(result, []).verify("t"))
    assert (err.value.status, err.value.reason) == (status, reason)


def test_token_review_failure_is_503() -> None:
    def review(token: str) -> ReviewResult:
        raise ConnectionRefusedError

    with pytest.raises(IdentityError) as err:
        asyncio.run(TokenReviewVerifier(review).verify("t"))
    assert err.value.status == 503


# --- SPIFFE ids ------------------------------------------------------------------------------


def test_spiffe_ids_round_trip() -> None:
    sid = spiffe_id("cluster.local", "shop", "cart.v2")
    assert sid == "spiffe://cluster.local/ns/shop/sa/cart.v2"
    assert parse_spiffe_id(sid) == ("cluster.local", "shop", "cart.v2")
    assert identity_from_username("system:serviceaccount:shop:cart").spiffe_id("td") == (
        "spiffe://td/ns/shop/sa/cart"
    )


@pytest.mark.parametrize(
    "bad",
    [
        "spiffe://td/ns/a/sa",
        "spiffe://td/ns/A/sa/b",
        "spiffe://td/ns/a/b/sa/c",
        "https://td/ns/a/sa/b",
        "spiffe://td/ns/../sa/b",
        "spiffe://td/ns/a/sa/..",
        "spiffe://td/ns/a/sa/b\n",
        "spiffe://td/ns/a\n/sa/b",
    ],
)
def test_bad_spiffe_ids(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_spiffe_id(bad)


def test_real_clock_by_default() -> None:
    issuer = Issuer.create(algorithm="ES256")
    v = JWKSVerifier(issuer.issuer_url, jwks=issuer.jwks())
    assert check(v, issuer.token("a", "b", ttl=60)).namespace == "a"
    with pytest.raises(IdentityError, match="expired"):
        check(v, issuer.token("a", "b", ttl=60, now=time.time() - 3600))


def test_a_cached_token_still_expires(issuer: Issuer) -> None:
    clock = [NOW]
    v = JWKSVerifier(issuer.issuer_url, jwks=issuer.jwks(), clock=lambda: clock[0])
    token = issuer.token("shop", "cart", now=NOW, ttl=600)
    assert check(v, token).service_account == "cart"
    clock[0] = NOW + 300
    assert check(v, token).service_account == "cart"  # from the cache
    clock[0] = NOW + 600 + 31  # past exp and the leeway
    with pytest.raises(IdentityError) as err:
        check(v, token)
    assert err.value.reason == "token-expired"
