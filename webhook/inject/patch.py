"""RFC 6902 JSON patch operations, emitted by the mutation steps as they change the pod.

The injector never diffs whole pods: each step that changes the copy also records the
operation that makes the same change, so the patch costs what the change costs (a full
``jsonpatch.make_patch`` of a realistic pod costs orders of magnitude more; ``make bench``).
Operations apply in order, so a
step may refer to indices as they are after the previous steps. Arrays are only inserted into,
appended to or removed from by index — never replaced wholesale, so concurrent defaulting by
other webhooks is not undone. Pure.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Patch", "escape", "pointer"]


def escape(token: str) -> str:
    """Escape one JSON-pointer reference token (RFC 6901: ``~`` → ``~0``, ``/`` → ``~1``)."""
    if "~" not in token and "/" not in token:
        return token  # the common case, and the hot path
    return token.replace("~", "~0").replace("/", "~1")


def pointer(*tokens: str | int) -> str:
    """A JSON pointer from raw (unescaped) tokens: ``pointer("metadata", "annotations", k)``."""
    return "".join(["/" + escape(t) if isinstance(t, str) else f"/{t}" for t in tokens])


class Patch:
    """An ordered list of RFC 6902 operations; ``ops`` is what the webhook sends."""

    __slots__ = ("ops",)

    def __init__(self) -> None:
        self.ops: list[dict[str, Any]] = []

    def add(self, path: str, value: Any) -> None:
        """Add a member, insert into an array at an index, or append with ``…/-``."""
        self.ops.append({"op": "add", "path": path, "value": value})

    def replace(self, path: str, value: Any) -> None:
        self.ops.append({"op": "replace", "path": path, "value": value})

    def remove(self, path: str) -> None:
        self.ops.append({"op": "remove", "path": path})

    def __len__(self) -> int:
        return len(self.ops)
