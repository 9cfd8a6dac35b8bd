"""`sidemesh --help` and `sidemesh inject` stay light: they never import the server, the CA or the
cluster client stacks (FastAPI, uvicorn, kubernetes, cryptography …), which would multiply the
start-up time of a command a user runs in a shell loop or a CI step. Each case runs the real
entry point (``python -X importtime -m webhook …``) in a fresh interpreter and reads the
interpreter's own list of what it imported. They run in an empty directory: where a development
CA exists (``certs/`` after ``make run``), ``sidemesh inject`` reads its trust bundle from there,
and checking that certificate does need cryptography."""

from __future__ import annotations

import subprocess
import sys
import tempfile

import pytest

from tests.conftest import REPO

#: Packages the light commands must not import: the server, CA, cluster and xDS stacks, and
#: the standard library's slow-to-import ones that only serve/discovery commands need.
HEAVY = (
    "fastapi",
    "starlette",
    "uvicorn",
    "kubernetes",
    "cryptography",
    "grpc",
    "jwt",
    "ssl",
    "multiprocessing",
    "urllib.request",
)


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


DEMO = str(REPO / "webhook/samples/demo-app.yaml")


def imported(*argv: str) -> set[str]:
    """Every module ``python ARGV`` imported (``-X importtime`` prints one line per module)."""
    with tempfile.TemporaryDirectory() as empty:
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", *argv],
            cwd=empty,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    modules = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "package":  # the header line
                modules.add(name)
    return modules


@pytest.mark.parametrize(
    "argv",
    [
        ("--help",),
        ("inject", "-f", DEMO),
        ("inject", "-f", DEMO, "-o", "json"),
        ("check", "-f", DEMO),
        ("init-traffic", "--dry-run"),
    ],
    ids=["help", "inject", "inject-json", "check", "init-traffic-dry-run"],
)
def test_light_commands_import_no_heavy_stack(argv: tuple[str, ...]) -> None:
    modules = imported("-m", "webhook", *argv)
    assert "webhook.cli.main" in modules  # the real entry point ran
    assert not heavy(modules), f"sidemesh {' '.join(argv)} imported {heavy(modules)}"


def test_the_check_would_notice() -> None:
    """The same reading sees a heavy stack when one is imported (the server's app module)."""
    modules = imported("-c", "import webhook.server.app, urllib.request")
    assert {"fastapi", "starlette", "urllib.request", "ssl"} <= set(heavy(modules))
