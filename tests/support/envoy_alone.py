"""One Envoy on loopback that answers every request itself (``direct_response``), with the
access loggers and connection-manager settings under test: telemetry's cost and the agent's
scrape, measured and tested on Envoy alone, without a lab."""

from __future__ import annotations

from typing import Any

__all__ = ["direct_response_config"]


def direct_response_config(
    port: int, admin: int, loggers: list[Any], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A bootstrap: ``127.0.0.1:port`` answers 200 ``hello``; admin on ``127.0.0.1:admin``."""
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
        ".v3.HttpConnectionManager",
        "stat_prefix": "alone",
        "access_log": loggers,
        "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"},
             "direct_response": {"status": 200, "body": {"inline_string": "hello"}}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        **(extra or {}),
    }  # fmt: skip
    addr = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": [{"name": "l", "address": addr, "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager",
                          "typed_config": hcm}]}]}]},
    }  # fmt: skip
