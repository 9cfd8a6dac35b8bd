"""Wire the access-policy filters into a sidecar's inbound listener (Envoy JSON dicts).

Pure. Every inbound chain gets references to the RBAC filters of
:mod:`webhook.policy.compiler` by name, delivered over ADS by extension config discovery:
the listener never changes with a policy, only the two small filter configs do, so a policy
change drains no connection (Envoy applies a new filter config to new HTTP streams and new TCP
connections). A sidecar whose workload no policy selects gets pass-through configs: adding the
first policy later changes nothing but those.

HTTP chains (each connection manager) also get a local reply mapper so a denial is a 403 whose
body names the deciding policy: ``access denied: rbac_access_denied_matched_policy[ns/name]``
(``[none]`` when no ALLOW policy admitted the request).
"""

from __future__ import annotations

import copy
from typing import Any, Final

from webhook.policy.compiler import ECDS_NAMES, HTTP_RBAC, TCP_RBAC
from webhook.ratelimit.compiler import SLOTS

__all__ = ["DENIED_BODY", "EXTENSION_CONFIG", "with_authz"]

EXTENSION_CONFIG: Final = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
DENIED_BODY: Final = "access denied: %RESPONSE_CODE_DETAILS%\n"
_HCM: Final = "envoy.filters.network.http_connection_manager"
_TCP_PROXY: Final = "envoy.filters.network.tcp_proxy"
_ADS: Final = {"ads": {}, "resource_api_version": "V3"}


def _ref(name: str, *type_urls: str) -> dict[str, Any]:
    return {
        "name": name,
        "config_discovery": {"config_source": _ADS, "type_urls": list(type_urls)},
    }


def _denied_reply() -> dict[str, Any]:
    return {
        "mappers": [
            {
                "filter": {
                    "status_code_filter": {
                        "comparison": {
                            "op": "EQ",
                            "value": {"default_value": 403, "runtime_key": "sidemesh.authz_403"},
                        }
                    }
                },
                "body_format_override": {"text_format_source": {"inline_string": DENIED_BODY}},
            }
        ]
    }


def with_authz(listener: dict[str, Any]) -> dict[str, Any]:
    """``listener`` (an inbound listener) with the policy filters on every chain (a copy)."""
    out = copy.deepcopy(listener)
    for chain in out.get("filter_chains", []):
        filters = chain.get("filters", [])
        for index, f in enumerate(filters):
            if f.get("name") == _HCM:
                hcm = f["typed_config"]
                # Access policy first: a denied request spends no rate-limit budget.
                refs = [_ref(n, HTTP_RBAC) for n in ECDS_NAMES["http"]]
                refs += [_ref(n, *types) for n, types in SLOTS.items()]
                hcm["http_filters"] = refs + hcm.get("http_filters", [])
                hcm["local_reply_config"] = _denied_reply()
                break
            if f.get("name") == _TCP_PROXY:
                filters[index:index] = [_ref(n, TCP_RBAC) for n in ECDS_NAMES["tcp"]]
                break
    return out
