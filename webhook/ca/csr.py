"""What a workload's certificate request must be before the CA signs its key.

Only the CSR's public key is used (the names come from the authenticated token, never from the
CSR). It must parse, prove possession of its key (the signature verifies) and be strong enough:
ECDSA P-256/P-384, RSA of at least 2048 bits, or Ed25519. It reads no file and no clock.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from webhook.errors import IdentityError

__all__ = ["checked_csr_key"]


def checked_csr_key(csr_pem: str | bytes) -> CertificatePublicKeyTypes:
    """The public key of a workload's CSR, once the CSR parses, its signature verifies and the
    key is one we accept; else :class:`IdentityError` (400) with the reason."""
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    try:
        csr = x509.load_pem_x509_csr(data)
        public = csr.public_key()
        valid = csr.is_signature_valid
    except (ValueError, TypeError, x509.UnsupportedGeneralNameType):
        raise IdentityError(400, "malformed-csr", "csr is not a PEM certificate request") from None
    except Exception:  # cryptography raises UnsupportedAlgorithm for odd keys
        raise IdentityError(400, "unsupported-key", "the CSR's key type is not supported") from None
    if not valid:
        raise IdentityError(400, "bad-csr-signature", "the CSR's signature does not verify")
    if isinstance(public, ec.EllipticCurvePublicKey):
        if not isinstance(public.curve, ec.SECP256R1 | ec.SECP384R1):
            raise IdentityError(
                400, "weak-key", f"ECDSA curve {public.curve.name} is not accepted (P-256, P-384)"
            )
    elif isinstance(public, rsa.RSAPublicKey):
        if public.key_size < 2048:
            raise IdentityError(
                400, "weak-key", f"RSA key of {public.key_size} bits is too weak (at least 2048)"
            )
    elif not isinstance(public, ed25519.Ed25519PublicKey):
        raise IdentityError(
            400,
            "unsupported-key",
            "key type not accepted (ECDSA P-256/P-384, RSA >= 2048, Ed25519)",
        )
    return public
