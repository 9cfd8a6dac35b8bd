"""What the installer puts into the node's CNI bin directory: a launcher named
``sidemesh-cni`` (the plugin's ``type``) and, next to it, ``sidemesh-cni.d/``: the ``webhook``
package's source files, copied from the installer's own environment.

A runtime executes CNI plugins on the node itself, outside any container image. The plugin
imports the standard library and sidemesh's own pure modules only (the API client stays in the
node agent, which the plugin asks over a Unix socket), so the payload carries no third-party
package and no compiled extension. The launcher runs the node's ``python3.X`` of the image's
minor version (the code is tested with that one), in isolated mode (``-E -S``: no environment,
no site packages — only the files of ``sidemesh-cni.d``). Without it, the launcher answers
with a CNI error saying so, and the pod's sandbox is not created: CNI mode needs that Python
and the iptables tools on every node (docs/cni.md).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import webhook

__all__ = ["MANIFEST", "PAYLOAD", "build", "launcher"]

#: Distributions whose code the plugin imports (their requirements are added transitively):
#: none — the plugin path is standard library only.
ROOTS: tuple[str, ...] = ()
#: The directory next to the launcher.
PAYLOAD = "sidemesh-cni.d"
#: In the payload: every file with its size, so that the installer can tell an up-to-date copy.
MANIFEST = ".manifest"
_SKIP_TOP = ("kubernetes/aio/",)
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")

MAIN = """\
from webhook.cni.plugin import main
raise SystemExit(main())
"""


def launcher(version: str = f"{sys.version_info.major}.{sys.version_info.minor}") -> str:
    """The ``sidemesh-cni`` file: a POSIX shell script that runs the payload."""
    msg = (
        f"sidemesh-cni: python{version} is not installed on this node; the plugin code was "
        "built for it (see docs/cni.md)"
    )
    error = json.dumps({"cniVersion": "1.0.0", "code": 5, "msg": msg})
    return f"""#!/bin/sh
# sidemesh's CNI plugin, written by `sidemesh cni install`; its code is in {PAYLOAD}/.
py=$(command -v python{version}) || {{ echo '{error}'; exit 1; }}
exec "$py" -E -S "$(dirname "$0")/{PAYLOAD}"
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
            if re.search(r"extra\s*==", req):
                continue
            match = _NAME.match(req)
            if match:
                todo.append(match.group(1))
    return list(seen.values())


def _keep(path: str) -> bool:
    parts = path.split("/")
    return (
        ".." not in parts
        and not parts[0].endswith((".dist-info", ".egg-info", ".data", ".pth"))
        and "__pycache__" not in parts
        and not path.startswith(_SKIP_TOP)
    )


def files() -> Iterator[tuple[Path, str]]:
    """(source file, path inside the payload) for everything the plugin needs."""
    package = Path(webhook.__file__).parent
    for source in sorted(package.rglob("*.py")):
        if "__pycache__" not in source.parts:
            yield source, "webhook/" + source.relative_to(package).as_posix()
    for dist in _closure(ROOTS):
        for file in dist.files or ():
            name = file.as_posix()
            if _keep(name):
                yield Path(str(file.locate())), name


def build(target: Path) -> int:
    """Write the payload directory ``target`` (which must not exist); returns its file count."""
    target.mkdir()
    listed = [f"sidemesh {webhook.__version__}"]
    for source, name in files():
        dest = target / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest)
        listed.append(f"{name} {dest.stat().st_size}")
    (target / "__main__.py").write_text(MAIN)
    listed.append(f"__main__.py {len(MAIN)}")
    (target / MANIFEST).write_text("\n".join(listed) + "\n")
    return len(listed) - 1
