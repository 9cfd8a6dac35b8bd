"""Putting sidemesh into the node's CNI configuration and taking it out again. Pure.

The runtime uses the first file of its CNI config directory in lexical order (``.conflist``,
``.conf`` or ``.json``). The installer adds sidemesh's entry to the end of that file's
``plugins`` chain, after the primary plugin (and any it chains itself, such as portmap), so
sidemesh runs once the pod has its addresses and gets them as ``prevResult``. A single-plugin
``.conf`` is turned into the equivalent ``.conflist`` first: a ``.conf`` cannot chain.
Removing the entry leaves the file as the primary plugin wrote it, apart from formatting.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from typing import Any, Final

__all__ = [
    "PLUGIN_TYPE",
    "choose",
    "has_entry",
    "insert",
    "parse",
    "remove",
    "render",
]

#: The plugin's file name in the CNI bin directory and its ``type`` in the chain.
PLUGIN_TYPE: Final = "sidemesh-cni"
_SUFFIXES: Final = (".conflist", ".conf", ".json")


class ConfError(ValueError):
    """The file is not a CNI network configuration we can chain into."""


def choose(filenames: Iterable[str]) -> str | None:
    """The file the runtime uses: the first config file in lexical order (None: none yet)."""
    candidates = sorted(n for n in filenames if n.endswith(_SUFFIXES) and not n.startswith("."))
    return candidates[0] if candidates else None


def parse(filename: str, text: str) -> dict[str, Any]:
    """A conflist (a single-plugin ``.conf`` is converted); ConfError says what is wrong."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfError(f"{filename}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfError(f"{filename}: not a JSON object")
    if "plugins" in data:
        plugins = data["plugins"]
        if (
            not isinstance(plugins, list)
            or not plugins
            or not all(isinstance(p, dict) for p in plugins)
        ):
            raise ConfError(f"{filename}: 'plugins' must be a non-empty list of objects")
        return data
    if "type" not in data:
        raise ConfError(f"{filename}: neither a conflist ('plugins') nor a plugin ('type')")
    plugin = {k: v for k, v in data.items() if k not in ("cniVersion", "name")}
    return {
        "cniVersion": data.get("cniVersion", "1.0.0"),
        "name": data.get("name", "k8s-pod-network"),
        "plugins": [plugin],
    }


def has_entry(conflist: Mapping[str, Any], entry: Mapping[str, Any]) -> bool:
    """Whether the chain ends with exactly ``entry``."""
    plugins = conflist.get("plugins") or []
    ours = [p for p in plugins if p.get("type") == PLUGIN_TYPE]
    return ours == [dict(entry)] and plugins[-1] == dict(entry)


def insert(conflist: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """``conflist`` with ``entry`` last in the chain (an older entry of ours replaced)."""
    out = remove(conflist)
    out["plugins"].append(copy.deepcopy(dict(entry)))
    return out


def remove(conflist: Mapping[str, Any]) -> dict[str, Any]:
    """``conflist`` without sidemesh's entry (unchanged when it has none)."""
    out = copy.deepcopy(dict(conflist))
    out["plugins"] = [p for p in out.get("plugins") or [] if p.get("type") != PLUGIN_TYPE]
    return out


def render(conflist: Mapping[str, Any]) -> str:
    return json.dumps(conflist, indent=2) + "\n"
