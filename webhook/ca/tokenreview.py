"""The TokenReview verifier: the API server decides whether a service-account token is valid.

For clusters whose token issuer keys are not at hand (no JWKS file or URL): each new token
costs one ``TokenReview`` call, made in a worker thread; answers are cached briefly. The
refusals are those of :mod:`webhook.ca.tokens` (``unauthenticated``, ``wrong-audience``,
``not-a-service-account``, ``token-review-unavailable`` …).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from webhook import names
from webhook.ca.tokens import Identity, identity_from_username
from webhook.errors import IdentityError

__all__ = ["ReviewResult", "TokenReviewVerifier"]


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
    (:meth:`webhook.kube.client.KubeClient.review_token` is one). It runs in a worker thread.
    Successful answers are cached for ``cache_seconds`` (keyed by the
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
            raise IdentityError(401, "invalid-token", "empty bearer token")
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
            raise IdentityError(
                401, "unauthenticated", f"the API server did not authenticate the token{why}"
            )
        # An empty audience list means the API server's own default audience: not ours.
        if self.audience not in result.audiences:
            raise IdentityError(
                403, "wrong-audience", f"the token is not meant for audience {self.audience!r}"
            )
        return identity_from_username(result.username, result.pod_name)
