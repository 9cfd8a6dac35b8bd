"""Choosing how the CA authenticates service-account tokens: flags and environment in,
a :class:`~webhook.ca.tokens.TokenVerifier` (or none) out.

Kept apart from :mod:`webhook.ca.api` so the CLI can parse these options without importing
the web framework.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from webhook.ca.tokenreview import TokenReviewVerifier
from webhook.ca.tokens import JWKSVerifier, TokenVerifier
from webhook.errors import SidemeshError

__all__ = ["VERIFIER_ENV", "VerifierOptions"]

#: The environment variables behind each :class:`VerifierOptions` field.
VERIFIER_ENV = {
    "jwks_file": "SIDEMESH_JWKS_FILE",
    "jwks_url": "SIDEMESH_JWKS_URL",
    "jwks_issuer": "SIDEMESH_JWKS_ISSUER",
    "jwks_ca_file": "SIDEMESH_JWKS_CA_FILE",
    "token_review": "SIDEMESH_TOKEN_REVIEW",
    "kubeconfig": "SIDEMESH_KUBECONFIG",
}


@dataclass(frozen=True)
class VerifierOptions:
    """How ``sidemesh serve`` authenticates tokens (picklable, so workers can rebuild it).

    Precedence: a JWKS source (``jwks_file`` or ``jwks_url``, with ``jwks_issuer``) if given;
    else TokenReview when ``token_review`` is set or when running in a cluster; else none (the
    CA endpoint is then not served). Environment variables fill what flags leave unset.
    """

    jwks_file: str | None = None
    jwks_url: str | None = None
    jwks_issuer: str | None = None
    jwks_ca_file: str | None = None
    token_review: bool = False
    kubeconfig: str | None = None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> VerifierOptions:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field_name, var in VERIFIER_ENV.items():
            if overrides.get(field_name) not in (None, False):
                values[field_name] = overrides[field_name]
            elif env.get(var):
                raw = env[var]
                values[field_name] = (
                    raw.lower() in {"1", "true", "yes"} if (field_name == "token_review") else raw
                )
        return cls(**values)

    def build(self, *, max_token_lifetime_seconds: int = 86400) -> TokenVerifier | None:
        if self.jwks_file or self.jwks_url:
            if not self.jwks_issuer:
                raise SidemeshError("--jwks-issuer is required with --jwks-file/--jwks-url")
            return JWKSVerifier(
                self.jwks_issuer,
                jwks_file=self.jwks_file,
                jwks_url=None if self.jwks_file else self.jwks_url,
                url_ca_file=self.jwks_ca_file,
                max_lifetime_seconds=max_token_lifetime_seconds,
            )
        from webhook.kube.client import KubeClient, in_cluster

        if self.token_review or self.kubeconfig or in_cluster():
            kube = KubeClient.connect(kubeconfig=self.kubeconfig)
            return TokenReviewVerifier(kube.review_token)
        return None
