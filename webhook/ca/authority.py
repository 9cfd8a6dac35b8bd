"""The bundled mini-CA: one self-signed root that signs the webhook's serving certificate and
every workload's SPIFFE certificate.

The root is ECDSA P-256 and long-lived; its key file is written with mode 0600 and is never
logged or returned. Two kinds of leaf certificates come out of it:

* the **serving certificate** of ``sidemesh serve`` (DNS names + IPs, serverAuth), so that the
  MutatingWebhookConfiguration's ``caBundle`` is simply the root;
* **workload certificates**, signed from a CSR whose key was generated in the pod. The caller
  (the ``/v1/certificates`` API) has already authenticated the requester and passes the SPIFFE
  ID it derived from the *token*; everything the CSR says about names is ignored here. Only the
  CSR's public key is used, after its signature and key strength have been checked.

Clock and directory are parameters: nothing in this module reads the time on its own.
"""

from __future__ import annotations

import functools
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from webhook import names
from webhook.ca.csr import checked_csr_key
from webhook.config import CAConfig
from webhook.errors import IdentityError, PKIError
from webhook.files import write_atomic

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "CLOCK_SKEW",
    "DEFAULT_SERVING_DNS",
    "DEFAULT_SERVING_IPS",
    "SERVICE_DNS_NAMES",
    "TLS_CERT",
    "TLS_KEY",
    "CertificateAuthority",
    "fingerprint_sha256",
    "load_roots",
    "private_dir",
    "resolve_ttl",
]

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
TLS_CERT = "tls.crt"
TLS_KEY = "tls.key"

#: Leaf certificates start this far in the past, so a peer whose clock runs a little behind
#: does not reject a certificate that was issued a second ago.
CLOCK_SKEW = timedelta(minutes=5)

#: The names the API server and the proxies use to reach the Service.
SERVICE_DNS_NAMES = names.control_plane_dns_names(names.SERVICE_NAME)
#: The Service's names plus a local one for ``make run`` on a laptop.
DEFAULT_SERVING_DNS: tuple[str, ...] = (*SERVICE_DNS_NAMES, "localhost")
DEFAULT_SERVING_IPS: tuple[str, ...] = ("127.0.0.1",)


@dataclass(frozen=True)
class CertificateAuthority:
    """A root certificate and its private key. Immutable; build with :meth:`create`/:meth:`load`."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    # --- construction and files ----------------------------------------------------------

    @classmethod
    def create(
        cls, *, now: datetime, common_name: str = "sidemesh root", days: int = 3650
    ) -> CertificateAuthority:
        """A new self-signed ECDSA P-256 root valid from ``now`` (minus the skew) for ``days``."""
        if days < 1:
            raise PKIError(f"a root must be valid for at least one day, not {days}")
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sidemesh"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        public = key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + timedelta(days=days))
            # pathlen 0: the root signs leaves only, never an intermediate.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                _key_usage(digital_signature=True, cert_sign=True, crl_sign=True), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert=cert, key=key)

    @classmethod
    def load(cls, directory: str | Path) -> CertificateAuthority:
        """Read ``ca.crt`` and ``ca.key`` from ``directory``; they must belong together."""
        d = Path(directory)
        try:
            cert_pem = (d / CA_CERT).read_bytes()
            key_pem = (d / CA_KEY).read_bytes()
        except OSError as exc:
            raise PKIError(
                f"no CA in {d}: cannot read {exc.filename} ({exc.strerror}); "
                "run `sidemesh ca init --dir " + str(d) + "`"
            ) from None
        return cls.from_pem(cert_pem, key_pem, where=str(d))

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes, *, where: str = ".") -> CertificateAuthority:
        """The CA from the contents of ``ca.crt`` and ``ca.key``.

        ``ca.crt`` may hold several roots (the overlap of a root rotation: old and new); the
        signer is the one whose key is in ``ca.key``, and there must be one.
        """
        roots = load_roots(cert_pem, where=f"{where}/{CA_CERT}")
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except ValueError as exc:
            raise PKIError(f"the CA files in {where} do not parse: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PKIError(f"{where}/{CA_KEY} is not an ECDSA key")
        numbers = key.public_key().public_numbers()
        for cert in roots:
            public = cert.public_key()
            if isinstance(public, ec.EllipticCurvePublicKey) and public.public_numbers() == numbers:
                return cls(cert=cert, key=key)
        if len(roots) == 1:
            _ec_public(roots[0])  # the clearer message for a lone non-ECDSA root
        raise PKIError(f"{where}/{CA_KEY} does not belong to {where}/{CA_CERT}")

    def save(self, directory: str | Path) -> None:
        """Write ``ca.crt`` (0644) and ``ca.key`` (0600), each atomically."""
        d = Path(directory)
        private_dir(d)
        # The key first: a crash in between leaves an orphan key, never a cert without one.
        write_atomic(d / CA_KEY, _key_pem(self.key).encode(), mode=0o600)
        write_atomic(d / CA_CERT, self.root_pem.encode(), mode=0o644)

    # --- facts -----------------------------------------------------------------------------

    @functools.cached_property
    def root_pem(self) -> str:
        """The root certificate as PEM: the trust bundle and the webhook's caBundle (public)."""
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def not_after(self) -> datetime:
        return self.cert.not_valid_after_utc

    def issued(self, cert: x509.Certificate) -> bool:
        """Whether ``cert`` carries a valid signature of this root."""
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True

    # --- issuing -------------------------------------------------------------------------------

    def issue_serving(
        self,
        dns_names: Sequence[str] = DEFAULT_SERVING_DNS,
        ips: Sequence[str] = DEFAULT_SERVING_IPS,
        *,
        now: datetime,
        ttl: timedelta = timedelta(seconds=CAConfig.serving_cert_ttl_seconds),
        uris: Sequence[str] = (),
    ) -> tuple[str, str]:
        """A serving certificate and its fresh ECDSA P-256 key, both PEM: ``(cert, key)``.

        ``uris``: SPIFFE ids too, for a server that sidecars verify by identity (xDS)."""
        if not dns_names and not ips:
            raise PKIError("a serving certificate needs at least one DNS name or IP")
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in _unique(dns_names)]
        sans += [x509.UniformResourceIdentifier(u) for u in _unique(uris)]
        for raw in _unique(ips):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(raw)))
            except ValueError:
                raise PKIError(f"{raw!r} is not an IP address") from None
        key = ec.generate_private_key(ec.SECP256R1())
        cn = dns_names[0] if dns_names else ips[0]
        builder = self._leaf(key.public_key(), now=now, ttl=ttl, subject=cn)
        cert = (
            builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM).decode(), _key_pem(key)

    def sign_workload(
        self, csr_pem: str | bytes, spiffe_id: str, *, now: datetime, ttl: timedelta
    ) -> str:
        """Sign a workload certificate for ``spiffe_id`` with the public key of ``csr_pem``.

        The CSR's subject and SANs are ignored: the identity is ``spiffe_id``, which the caller
        took from an authenticated token. Raises :class:`IdentityError` (400) for a CSR that
        does not parse, whose signature does not verify, or whose key is weak or unsupported.
        """
        public = checked_csr_key(csr_pem)
        rsa_key = isinstance(public, rsa.RSAPublicKey)
        cert = (
            self._leaf(public, now=now, ttl=ttl, subject=None)
            # The subject is empty, so RFC 5280 §4.2.1.6 wants the SAN marked critical.
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
                critical=True,
            )
            # keyEncipherment only makes sense for RSA key transport (TLS 1.2 RSA suites).
            .add_extension(
                _key_usage(digital_signature=True, key_encipherment=rsa_key), critical=True
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM).decode()

    def _leaf(
        self,
        public: CertificatePublicKeyTypes,
        *,
        now: datetime,
        ttl: timedelta,
        subject: str | None,
    ) -> x509.CertificateBuilder:
        if ttl <= timedelta(0):
            raise PKIError(f"a certificate lifetime must be positive, not {ttl}")
        not_before = max(now - CLOCK_SKEW, self.cert.not_valid_before_utc)
        # Never outlive the root: a chain is only as valid as its shortest link.
        not_after = min(now + ttl, self.cert.not_valid_after_utc)
        if not_after <= now:
            raise PKIError(f"the root expired at {self.cert.not_valid_after_utc.isoformat()}")
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)] if subject else [])
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(self.cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(self._aki, critical=False)
        )

    @functools.cached_property
    def _aki(self) -> x509.AuthorityKeyIdentifier:
        try:
            ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        except x509.ExtensionNotFound:
            return x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key())
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


# --- policy helpers (pure) ---------------------------------------------------------------------


def resolve_ttl(requested: int | None, config: CAConfig) -> timedelta:
    """The lifetime to issue for a request: the default when none is asked for.

    A request outside ``[min_ttl_seconds, max_ttl_seconds]`` is refused (400) rather than
    clamped, so a client never silently gets less than it planned its renewal around.
    """
    if requested is None:
        return timedelta(seconds=config.default_ttl_seconds)
    if isinstance(requested, bool) or not isinstance(requested, int):
        raise IdentityError(400, "bad-ttl", "ttlSeconds must be an integer")
    if requested > config.max_ttl_seconds:
        raise IdentityError(
            400,
            "ttl-too-long",
            f"ttlSeconds {requested} is above the maximum of {config.max_ttl_seconds}",
        )
    if requested < config.min_ttl_seconds:
        raise IdentityError(
            400,
            "ttl-too-short",
            f"ttlSeconds {requested} is below the minimum of {config.min_ttl_seconds}",
        )
    return timedelta(seconds=requested)


_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"


def load_roots(pem: bytes, *, where: str = CA_CERT) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle, all or nothing.

    cryptography silently skips a block cut off before its END line, so a half-written
    bundle would pass as a shorter one: count the BEGIN lines and refuse a mismatch.
    """
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise PKIError(f"{where} holds no complete PEM certificate") from None
    if len(certs) != pem.count(_PEM_BEGIN):
        raise PKIError(f"{where} ends in an incomplete certificate")
    return certs


def fingerprint_sha256(cert: x509.Certificate) -> str:
    """``AB:CD:…`` like ``openssl x509 -fingerprint -sha256``."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


# --- the PKI directory ---------------------------------------------------------------------


def private_dir(directory: Path) -> None:
    """Create ``directory`` with mode 0700 (it will hold private keys) unless it exists.

    Exactly 0700 whatever the umask; a directory that already exists is left as it is (it may
    be a mounted Secret, or one whose mode the operator chose)."""
    try:
        directory.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        return
    os.chmod(directory, 0o700)  # mkdir's mode is masked by the umask


# --- internals -------------------------------------------------------------------------------


def _ec_public(cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise PKIError("the root certificate's key is not ECDSA")
    return public


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _unique(items: Iterable[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        if item not in out:
            out.append(item)
    return out
