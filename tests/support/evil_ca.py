"""A misbehaving CA for the agent's tests: real HTTPS, with a serving certificate from the mesh
root, answering ``POST /v1/certificates`` the way a broken or compromised control plane might.

Every answer is chosen by :attr:`EvilCA.mode` (read per request, so a test can switch it, or by
the file ``mode`` in its directory when run as a process)::

    good             a correct certificate for the CSR's key and SPIFFE ID (``ttlSeconds``)
    other-root       signed by a root the pod does not trust
    expired          valid an hour ago, not now          not-yet-valid  valid from in an hour
    wrong-id         for another service account         ca-cert        leaf with CA:true
    other-key        for a key that is not the CSR's     swapped-bundle good, trustBundle foreign
    redirect         302 to a plain-HTTP listener that records whatever reaches it
    truncated        Content-Length larger than the body, then close
    invalid-json     huge-json (2 MiB)                   nested-json    100k nested arrays
    not-object       a JSON list                         http-500       an error answer
    trickle          a byte every 0.2 s, never finishing  reset         RST after the request

Refused connections need no mode: point the agent at a port nobody listens on.

    python -m tests.support.evil_ca DIR   # in a test's namespace: writes DIR/ca.crt, serves on
                                          # 127.0.0.1:<port>, prints "listening <port>"
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import struct
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from webhook.ca.authority import CertificateAuthority

__all__ = ["MODES", "EvilCA"]

MODES = (
    "good",
    "other-root",
    "expired",
    "not-yet-valid",
    "wrong-id",
    "ca-cert",
    "other-key",
    "swapped-bundle",
    "redirect",
    "truncated",
    "invalid-json",
    "huge-json",
    "nested-json",
    "not-object",
    "http-500",
    "trickle",
    "reset",
)


_DIGITAL_SIGNATURE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


class EvilCA:
    """The CA server; ``requests`` records (monotonic time, mode) of every certificate request,
    ``leaks`` every request that reached the redirect target."""

    def __init__(self, directory: Path, mode: str = "good") -> None:
        now = datetime.now(UTC)
        self.root = CertificateAuthority.create(now=now)
        self.other = CertificateAuthority.create(now=now, common_name="not the mesh")
        self.directory = directory
        (directory / "ca.crt").write_text(self.root.root_pem)
        self.mode_file = directory / "mode"
        self.mode_file.write_text(mode)
        self.requests: list[tuple[float, str]] = []
        self.leaks: list[str] = []
        cert, key = self.root.issue_serving(["localhost"], ["127.0.0.1"], now=now)
        (directory / "tls.crt").write_text(cert)
        (directory / "tls.key").write_text(key)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(directory / "tls.crt", directory / "tls.key")
        self.server = _Server(("127.0.0.1", 0), _Handler, self)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.plain = _Server(("127.0.0.1", 0), _LeakHandler, self)
        self.plain_port = self.plain.server_address[1]
        for srv in (self.server, self.plain):
            threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def mode(self) -> str:
        return self.mode_file.read_text().strip()

    @mode.setter
    def mode(self, value: str) -> None:
        self.mode_file.write_text(value)

    @property
    def address(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def close(self) -> None:
        for srv in (self.server, self.plain):
            srv.shutdown()
            srv.server_close()

    # --- answers ------------------------------------------------------------------------

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        mode = self.mode
        csr = x509.load_pem_x509_csr(str(request["csr"]).encode())
        uris = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        spiffe = uris.get_values_for_type(x509.UniformResourceIdentifier)[0]
        ttl = timedelta(seconds=int(request.get("ttlSeconds") or 600))
        now = datetime.now(UTC)
        public = csr.public_key()
        signer, bundle = self.root, self.root.root_pem
        if mode == "other-root":
            signer = self.other
        elif mode == "swapped-bundle":
            bundle = self.other.root_pem
        elif mode == "wrong-id":
            spiffe = spiffe.rsplit("/", 1)[0] + "/someone-else"
        elif mode == "other-key":
            public = ec.generate_private_key(ec.SECP256R1()).public_key()
        start, end = now - timedelta(seconds=5), now + ttl
        if mode == "expired":
            start, end = now - timedelta(hours=2), now - timedelta(hours=1)
        elif mode == "not-yet-valid":
            start, end = now + timedelta(hours=1), now + timedelta(hours=2)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(signer.cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(
                x509.BasicConstraints(ca=mode == "ca-cert", path_length=None), critical=True
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe)]),
                critical=True,
            )
            # The rest as the real CA writes it, so that only the fault differs.
            .add_extension(_DIGITAL_SIGNATURE, critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.key.public_key()),
                critical=False,
            )
        )
        cert = builder.sign(signer.key, hashes.SHA256())
        chain = cert.public_bytes(serialization.Encoding.PEM).decode()
        return {"certificateChain": chain, "trustBundle": bundle}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: Any, ca: EvilCA) -> None:
        super().__init__(address, handler)
        self.ca = ca


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        ca = self.server.ca
        mode = ca.mode
        ca.requests.append((time.monotonic(), mode))
        print(f"request {mode}", flush=True)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if mode == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.close()
            return
        if mode == "redirect":
            target = f"http://127.0.0.1:{ca.plain_port}/v1/certificates"
            self._send(302, b"", extra={"Location": target})
            return
        if mode == "trickle":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            with contextlib.suppress(OSError):
                for _ in range(10_000):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.2)
            return
        payloads = {
            "invalid-json": b"{not json",
            "huge-json": b'{"certificateChain": "' + b"A" * (2 << 20) + b'"}',
            "nested-json": b"[" * 100_000 + b"]" * 100_000,
            "not-object": b'["certificateChain"]',
        }
        if mode in payloads:
            self._send(200, payloads[mode])
        elif mode == "http-500":
            self._send(500, b'{"error": "internal", "message": "try later"}')
        elif mode == "truncated":
            data = json.dumps(ca.answer(json.loads(body))).encode()
            self._send(200, data[:100], length=len(data))
            self.close_connection = True
        else:
            self._send(200, json.dumps(ca.answer(json.loads(body))).encode())

    def _send(
        self,
        status: int,
        data: bytes,
        *,
        length: int | None = None,
        extra: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data) if length is None else length))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(data)


class _LeakHandler(BaseHTTPRequestHandler):
    """The redirect target: anything that arrives here was sent in clear text."""

    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.server.ca.leaks.append(self.headers.get("Authorization", ""))
        print("leak", flush=True)
        self.send_response(500)
        self.end_headers()


def main(argv: list[str]) -> None:
    ca = EvilCA(Path(argv[0]), argv[1] if len(argv) > 1 else "good")
    print(f"listening {ca.port}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1:])
