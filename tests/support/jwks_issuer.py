"""A test token issuer that signs tokens shaped like Kubernetes projected service-account tokens.

Reusable by any test (the end-to-end test signs the proxies' tokens with it)::

    from tests.support.jwks_issuer import Issuer

    issuer = Issuer.create("https://kubernetes.default.svc.cluster.local")
    issuer.write_jwks(tmp_path / "jwks.json")          # what `sidemesh serve --jwks-file` reads
    token = issuer.token("shop", "cart", "cart-7d9f-abcde")   # audience sidemesh-ca, 1 h

The key is generated once per :meth:`Issuer.create` (RSA 2048 for RS256 like the API server,
or P-256 for ES256). Every knob a negative test needs is a keyword: ``now``, ``not_before``,
``issuer``, ``subject``, ``audience``, ``drop`` (claims to remove) and ``extra`` (claims to add
or override).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

__all__ = ["DEFAULT_ISSUER", "Issuer"]

DEFAULT_ISSUER = "https://kubernetes.default.svc.cluster.local"


@dataclass(frozen=True)
class Issuer:
    issuer_url: str
    algorithm: str
    kid: str
    private_key: Any

    @classmethod
    def create(
        cls, issuer_url: str = DEFAULT_ISSUER, *, algorithm: str = "RS256", kid: str | None = None
    ) -> Issuer:
        if algorithm == "RS256":
            key: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif algorithm == "ES256":
            key = ec.generate_private_key(ec.SECP256R1())
        else:
            raise ValueError(f"unsupported algorithm {algorithm}")
        return cls(issuer_url, algorithm, kid or uuid.uuid4().hex[:16], key)

    def jwks(self) -> dict[str, Any]:
        """The public key set, as the API server serves it at /openid/v1/jwks."""
        alg = jwt.get_algorithm_by_name(self.algorithm)
        jwk = json.loads(alg.to_jwk(self.private_key.public_key()))
        jwk.update({"kid": self.kid, "use": "sig", "alg": self.algorithm})
        return {"keys": [jwk]}

    def write_jwks(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(json.dumps(self.jwks(), indent=2), encoding="utf-8")
        return p

    def claims(
        self,
        namespace: str,
        service_account: str,
        pod_name: str,
        *,
        audience: str | list[str] = "sidemesh-ca",
        ttl: int = 3600,
        now: float | None = None,
        not_before: float | None = None,
        issuer: str | None = None,
        subject: str | None = None,
        drop: tuple[str, ...] = (),
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The claims of a projected token bound to a pod (what :meth:`token` signs)."""
        t = int(time.time() if now is None else now)
        claims: dict[str, Any] = {
            "aud": [audience] if isinstance(audience, str) else audience,
            "exp": t + ttl,
            "iat": t,
            "nbf": int(not_before) if not_before is not None else t,
            "iss": issuer or self.issuer_url,
            "jti": uuid.uuid4().hex,
            "sub": subject or f"system:serviceaccount:{namespace}:{service_account}",
            "kubernetes.io": {
                "namespace": namespace,
                "pod": {"name": pod_name, "uid": str(uuid.uuid4())},
                "serviceaccount": {"name": service_account, "uid": str(uuid.uuid4())},
            },
        }
        for name in drop:
            claims.pop(name, None)
        claims.update(extra or {})
        return claims

    def token(
        self,
        namespace: str,
        service_account: str,
        pod_name: str = "pod-0",
        audience: str | list[str] = "sidemesh-ca",
        ttl: int = 3600,
        **knobs: Any,
    ) -> str:
        """A signed token for ``system:serviceaccount:<namespace>:<service_account>``."""
        claims = self.claims(
            namespace, service_account, pod_name, audience=audience, ttl=ttl, **knobs
        )
        return self.sign(claims)

    def sign(self, claims: dict[str, Any]) -> str:
        """Sign arbitrary claims with this issuer's key and key id."""
        return jwt.encode(
            claims, self.private_key, algorithm=self.algorithm, headers={"kid": self.kid}
        )
