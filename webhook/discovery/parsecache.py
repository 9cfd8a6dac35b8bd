"""The push engine's memo of parsed objects between model builds (see :func:`build_model`)."""

from __future__ import annotations

from typing import Any

from webhook.discovery.model import Endpoint

__all__ = ["ParseCache"]


class ParseCache:
    """Parsed objects by identity, kept between builds: the store never mutates an object, it
    replaces it, so an object seen before parses to the same value. After one endpoint change
    a rebuild re-reads one EndpointSlice, not the whole mesh."""

    def __init__(self) -> None:
        self._memo: dict[int, tuple[Any, Any]] = {}
        self._live: set[int] = set()
        self.endpoints: dict[tuple[Any, ...], Endpoint] = {}

    def get(self, obj: Any, parse: Any) -> Any:
        key = id(obj)
        self._live.add(key)
        hit = self._memo.get(key)
        if hit is not None and hit[0] is obj:
            return hit[1]
        value = parse(obj)
        self._memo[key] = (obj, value)
        return value

    def endpoint(
        self,
        ip: str,
        port: int,
        identity: str | None,
        pod: str | None,
        workload: tuple[str, str] | None = None,
    ) -> Endpoint:
        # The same instance for the same endpoint: comparing two builds' tuples is then cheap.
        key = (ip, port, identity, pod, workload)
        ep = self.endpoints.get(key)
        if ep is None:
            ep = self.endpoints[key] = Endpoint(ip, port, identity, pod, workload)
        return ep

    def sweep(self) -> None:
        """Forget what the last build did not see (deleted or replaced objects)."""
        self._memo = {k: v for k, v in self._memo.items() if k in self._live}
        self._live = set()
        if len(self.endpoints) > 4 * max(1, len(self._memo)):
            self.endpoints = {}
