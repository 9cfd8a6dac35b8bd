"""The plugin file the installer puts into the node's CNI bin directory: a Python zip
application (PEP 441) holding ``webhook`` and the pure-Python packages the plugin imports
(``kubernetes`` and what it requires, PyYAML), built from the installer's own environment.

A runtime executes CNI plugins on the node itself, outside any container image, so the file
must carry everything it needs: its only requirements on the node are ``python3`` (3.11 or
newer) and the iptables tools, both checked with a clear error. Compiled extension modules
are left out; the packages used fall back to their pure-Python code (PyYAML's loader).
"""

from __future__ import annotations

import io
import re
import zipfile
from importlib import metadata
from pathlib import Path

import webhook

__all__ = ["MAIN", "build"]

#: Distributions whose code the plugin imports; their requirements are added transitively.
ROOTS = ("kubernetes", "PyYAML")
_SKIP_SUFFIXES = (".so", ".pyd", ".pyc", ".pyi", ".exe", ".dll")
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")

MAIN = """\
import json, sys
if sys.version_info < (3, 11):
    print(json.dumps({"cniVersion": "1.0.0", "code": 5,
                      "msg": "sidemesh-cni needs python3 >= 3.11 on the node"}))
    sys.exit(1)
from webhook.cni.plugin import main
sys.exit(main())
"""


def _closure(roots: tuple[str, ...]) -> list[metadata.Distribution]:
    seen: dict[str, metadata.Distribution] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional requirement (or one for another Python) not installed
        seen[key] = dist
        for req in dist.requires or ():
            if "extra ==" in req.replace("extra==", "extra =="):
                continue
            match = _NAME.match(req)
            if match:
                todo.append(match.group(1))
    return list(seen.values())


def _keep(path: str) -> bool:
    parts = path.split("/")
    return (
        ".." not in parts
        and not parts[0].endswith((".dist-info", ".egg-info", ".data"))
        and "__pycache__" not in parts
        and not path.endswith(_SKIP_SUFFIXES)
    )


def build(target: Path) -> int:
    """Write the plugin to ``target`` (mode 0755); returns its size in bytes."""
    buf = io.BytesIO()
    buf.write(b"#!/usr/bin/env python3\n")
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        zf.writestr("__main__.py", MAIN)
        package = Path(webhook.__file__).parent
        for source in sorted(package.rglob("*.py")):
            if "__pycache__" not in source.parts:
                zf.write(source, "webhook/" + source.relative_to(package).as_posix())
        for dist in _closure(ROOTS):
            for file in dist.files or ():
                name = file.as_posix()
                if _keep(name):
                    zf.write(Path(str(file.locate())), name)
    data = buf.getvalue()
    target.write_bytes(data)
    target.chmod(0o755)
    return len(data)
