"""`sidemesh ca …` as a user runs it: the real console script on a real directory."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tests.conftest import REPO, require_tools
from tests.support.serve_process import SIDEMESH


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SIDEMESH, "ca", *args], capture_output=True, text=True, cwd=REPO, check=False
    )


def verify(ca: Path, leaf: Path) -> str:
    require_tools("openssl")
    out = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca), "-purpose", "sslserver", str(leaf)],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout + out.stderr


def test_make_certs_sequence_gives_a_verifiable_serving_cert(tmp_path: Path) -> None:
    d = tmp_path / "certs"
    # What `make certs` runs, twice: the second run keeps the root.
    for _ in range(2):
        assert run("init", "--dir", str(d), "--if-missing").returncode == 0
        assert run("serving-cert", "--dir", str(d)).returncode == 0
    assert verify(d / "ca.crt", d / "tls.crt").strip().endswith("OK")
    modes = {p.name: p.stat().st_mode & 0o777 for p in d.iterdir()}
    assert modes == {"ca.crt": 0o644, "ca.key": 0o600, "tls.crt": 0o644, "tls.key": 0o600}


def test_init_creates_its_directory_private_whatever_the_umask(tmp_path: Path) -> None:
    """The directory holds the root key: 0700 even for a user with umask 000; an existing
    directory keeps the mode its owner gave it."""
    fresh = tmp_path / "a" / "certs"
    done = subprocess.run(
        ["sh", "-c", 'umask 000 && exec "$@"', "sh", *SIDEMESH, "ca", "init", "--dir", str(fresh)],
        capture_output=True, text=True, cwd=REPO, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert fresh.stat().st_mode & 0o777 == 0o700
    assert {p.name: p.stat().st_mode & 0o777 for p in fresh.iterdir()} == {
        "ca.crt": 0o644,
        "ca.key": 0o600,
    }
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o750)
    shared.chmod(0o750)
    assert run("init", "--dir", str(shared)).returncode == 0
    assert shared.stat().st_mode & 0o777 == 0o750


def test_init_refuses_to_overwrite_a_root_unless_forced(tmp_path: Path) -> None:
    assert run("init", "--dir", str(tmp_path)).returncode == 0
    first = (tmp_path / "ca.crt").read_text()
    refused = run("init", "--dir", str(tmp_path))
    assert refused.returncode == 1 and "--force" in refused.stderr
    assert (tmp_path / "ca.crt").read_text() == first
    forced = run("init", "--dir", str(tmp_path), "--force")
    assert forced.returncode == 0
    assert (tmp_path / "ca.crt").read_text() != first


def test_serving_cert_with_given_names(tmp_path: Path) -> None:
    assert run("init", "--dir", str(tmp_path)).returncode == 0
    out = run("serving-cert", "--dir", str(tmp_path), "--dns", "a.example", "--ip", "10.9.8.7")
    assert out.returncode == 0, out.stderr
    cert = x509.load_pem_x509_certificate((tmp_path / "tls.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a.example"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["10.9.8.7"]


def test_serving_cert_without_a_root_says_what_to_run(tmp_path: Path) -> None:
    out = run("serving-cert", "--dir", str(tmp_path))
    assert out.returncode == 1 and "sidemesh ca init" in out.stderr


def test_show_prints_fingerprints_and_never_a_key(tmp_path: Path) -> None:
    run("init", "--dir", str(tmp_path))
    run("serving-cert", "--dir", str(tmp_path))
    out = run("show", "--dir", str(tmp_path))
    assert out.returncode == 0
    for name in ("ca.crt", "tls.crt"):
        cert = x509.load_pem_x509_certificate((tmp_path / name).read_bytes())
        assert cert.fingerprint(hashes.SHA256()).hex(":").upper() in out.stdout
        assert cert.not_valid_after_utc.isoformat() in out.stdout
    assert "CN=sidemesh root,O=sidemesh" in out.stdout
    assert "mode 0600" in out.stdout
    for key in ("ca.key", "tls.key"):
        body = (tmp_path / key).read_text().splitlines()[1]
        assert body not in out.stdout + out.stderr
    assert "PRIVATE KEY" not in out.stdout


def test_bundle_is_the_base64_root(tmp_path: Path) -> None:
    run("init", "--dir", str(tmp_path))
    out = run("bundle", "--dir", str(tmp_path))
    assert out.returncode == 0
    assert base64.b64decode(out.stdout.strip()) == (tmp_path / "ca.crt").read_bytes()
    missing = run("bundle", "--dir", str(tmp_path / "nope"))
    assert missing.returncode == 1 and "cannot read" in missing.stderr
