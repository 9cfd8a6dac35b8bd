"""`sidemesh ca …`: the development PKI on disk.

``init`` makes the root, ``serving-cert`` the webhook's certificate, ``show`` describes what is
in the directory (never a key's content) and ``bundle`` prints the base64 ``caBundle`` for a
MutatingWebhookConfiguration. Every command takes ``--dir`` (default ``certs/``).
"""

from __future__ import annotations

import argparse
import base64
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from webhook.errors import PKIError

__all__ = ["register"]

DEFAULT_DIR = "certs"


def register(subparsers: Any) -> None:
    ca = subparsers.add_parser(
        "ca", help="the bundled mini-CA: root, serving certificate, caBundle"
    )
    sub = ca.add_subparsers(dest="ca_command", metavar="CA_COMMAND")
    sub.required = True

    init = sub.add_parser("init", help="create the mesh root (ca.crt, ca.key)")
    _dir(init)
    init.add_argument("--if-missing", action="store_true", help="keep an existing root and exit 0")
    init.add_argument("--force", action="store_true", help="replace an existing root")
    init.add_argument("--days", type=int, default=3650, help="root lifetime (default 3650)")
    init.add_argument("--common-name", default="sidemesh root", help="the root's CN")
    init.set_defaults(handler=_init)

    serving = sub.add_parser(
        "serving-cert", help="issue a fresh serving certificate (tls.crt, tls.key)"
    )
    _dir(serving)
    serving.add_argument(
        "--dns",
        action="append",
        metavar="NAME",
        help="DNS name (repeatable); with --dns or --ip only the given names are used, "
        "otherwise the Service names of sidemesh plus localhost and 127.0.0.1",
    )
    serving.add_argument("--ip", action="append", metavar="ADDR", help="IP address (repeatable)")
    serving.add_argument(
        "--days", type=int, default=None, help="lifetime (default: ca.serving_cert_ttl_seconds)"
    )
    serving.add_argument("--config", default=None, help="mesh config file (YAML)")
    serving.set_defaults(handler=_serving_cert)

    show = sub.add_parser("show", help="subject, SHA-256 fingerprint and expiry of each file")
    _dir(show)
    show.set_defaults(handler=_show)

    bundle = sub.add_parser("bundle", help="print the base64 caBundle (the root certificate)")
    _dir(bundle)
    bundle.set_defaults(handler=_bundle)


def _dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir", default=DEFAULT_DIR, type=Path, help=f"PKI directory (default {DEFAULT_DIR}/)"
    )


def _now() -> datetime:
    return datetime.now(UTC)


def _init(args: argparse.Namespace) -> int:
    from webhook.ca.authority import CA_CERT, CA_KEY, CertificateAuthority

    d: Path = args.dir
    exists = (d / CA_CERT).exists() or (d / CA_KEY).exists()
    if exists and args.if_missing and not args.force:
        CertificateAuthority.load(d)  # refuse a broken pair even when keeping it
        print(f"root exists in {d}, kept")
        return 0
    if exists and not args.force:
        raise PKIError(
            f"a root already exists in {d}; pass --force to replace it "
            "(every certificate it issued stops being trusted)"
        )
    ca = CertificateAuthority.create(now=_now(), common_name=args.common_name, days=args.days)
    ca.save(d)
    print(f"root written to {d / CA_CERT} (key {d / CA_KEY}, mode 0600)")
    if exists:
        print("the old root was replaced: run `sidemesh ca serving-cert` and re-issue workloads")
    return 0


def _serving_cert(args: argparse.Namespace) -> int:
    from webhook.ca.authority import (
        DEFAULT_SERVING_DNS,
        DEFAULT_SERVING_IPS,
        TLS_CERT,
        CertificateAuthority,
    )
    from webhook.ca.serving import write_serving_pair
    from webhook.config import load_config_file

    d: Path = args.dir
    ca = CertificateAuthority.load(d)
    if args.dns or args.ip:
        dns, ips = tuple(args.dns or ()), tuple(args.ip or ())
    else:
        dns, ips = DEFAULT_SERVING_DNS, DEFAULT_SERVING_IPS
    if args.days is not None:
        ttl = timedelta(days=args.days)
    else:
        ttl = timedelta(seconds=load_config_file(args.config).ca.serving_cert_ttl_seconds)
    cert_pem, key_pem = ca.issue_serving(dns, ips, now=_now(), ttl=ttl)
    write_serving_pair(d, cert_pem, key_pem)
    print(f"serving certificate written to {d / TLS_CERT} for {', '.join((*dns, *ips))}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from cryptography import x509

    from webhook.ca.authority import CA_CERT, CA_KEY, TLS_CERT, TLS_KEY, fingerprint_sha256

    d: Path = args.dir
    found = False
    for name in (CA_CERT, TLS_CERT):
        path = d / name
        if not path.exists():
            print(f"{path}: missing")
            continue
        found = True
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except ValueError:
            print(f"{path}: not a PEM certificate")
            continue
        print(f"{path}:")
        print(f"  subject:     {cert.subject.rfc4514_string() or '(empty)'}")
        print(f"  issuer:      {cert.issuer.rfc4514_string()}")
        print(f"  sha256:      {fingerprint_sha256(cert)}")
        print(f"  not before:  {cert.not_valid_before_utc.isoformat()}")
        print(f"  not after:   {cert.not_valid_after_utc.isoformat()}{_left(cert)}")
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            print(f"  names:       {', '.join(str(v.value) for v in san)}")
        except x509.ExtensionNotFound:
            pass
    for name in (CA_KEY, TLS_KEY):
        path = d / name
        if path.exists():
            # Only the mode: the key's content is never printed.
            print(f"{path}: private key, mode {path.stat().st_mode & 0o777:04o}")
    if not found:
        print(f"no certificates in {d}; run `sidemesh ca init --dir {d}`", file=sys.stderr)
        return 1
    return 0


def _left(cert: Any) -> str:
    left = cert.not_valid_after_utc - _now()
    if left.total_seconds() <= 0:
        return "  (EXPIRED)"
    return f"  ({left.days} days left)"


def _bundle(args: argparse.Namespace) -> int:
    from webhook.ca.authority import CA_CERT

    path: Path = args.dir / CA_CERT
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise PKIError(f"cannot read {path}: {exc.strerror}") from None
    if b"BEGIN CERTIFICATE" not in pem:
        raise PKIError(f"{path} is not a PEM certificate")
    print(base64.b64encode(pem).decode())
    return 0
