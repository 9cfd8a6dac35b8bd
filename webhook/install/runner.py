"""How the install reaches ``kubectl``: one command at a time through a :class:`Runner`.

The runner (argv + stdin → :class:`Completed`) is the seam tests use to check the order of
cluster commands without a cluster; :func:`run_subprocess` is the real one.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from webhook.errors import SidemeshError

__all__ = ["Completed", "InstallError", "Runner", "run_subprocess"]


class InstallError(SidemeshError):
    """The install or uninstall cannot go on; the message says what state the cluster is in."""


@dataclass(frozen=True)
class Completed:
    """What a command did: exit code and its two output streams."""

    returncode: int
    stdout: str = ""
    stderr: str = ""


class Runner(Protocol):
    """Runs one command (``argv[0]`` is the program) with ``stdin`` as its input."""

    def __call__(self, argv: Sequence[str], stdin: str | None = None) -> Completed: ...


def run_subprocess(argv: Sequence[str], stdin: str | None = None) -> Completed:
    """The real runner. A missing program is an :class:`InstallError`, not a traceback."""
    try:
        proc = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, check=False, timeout=900
        )
    except FileNotFoundError:
        raise InstallError(
            f"{argv[0]} not found on PATH (sidemesh drives the cluster through it)"
        ) from None
    except subprocess.TimeoutExpired:
        raise InstallError(f"{' '.join(argv[:4])} … did not finish in 15 minutes") from None
    return Completed(proc.returncode, proc.stdout, proc.stderr)
