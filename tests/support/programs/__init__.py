"""Programs that tests run as child processes (apps inside pods, servers, clients).

Each is a script (``python PROGRAM ARGS``) that any uid can run; they are files, not strings,
so that ruff and mypy check them like the rest of the tests.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["PROGRAMS"]

#: The directory of the programs: run one as ``[sys.executable, str(PROGRAMS / "name.py"), …]``.
PROGRAMS = Path(__file__).resolve().parent
