"""Wire the access-policy filters into a sidecar's inbound listener (Envoy JSON dicts).

Pure. Every inbound chain gets references to the RBAC filters of
:mod:`webhook.policy.compiler` by name, delivered over ADS by extension config discovery:
the listener never changes with a policy, only the two small filter configs do, so a policy
change drains no connection (Envoy applies a new filter config to new HTTP streams and new TCP
connections). A sidecar whose workload no policy selects gets pass-through configs: adding the
first policy later changes nothing but those.

HTTP chains (each connection manager) also get a local reply mapper so a denial is a 403 whose
body names the deciding policy: ``access denied: rbac_access_denied_matched_policy[ns/name]``
(``[none]`` when no ALLOW policy admitted the request). Every chain logs its denials to the
sidecar's standard output, one line each (an access log whose filter keeps only what the RBAC
filters refused)::

    sidemesh-authz denied http spiffe://…/sa/other GET /admin port=8080 \
        rbac_access_denied_matched_policy[demo/no-admin]
    sidemesh-authz denied tcp spiffe://…/sa/other port=9000 rbac_access_denied_matched_policy[none]

TCP chains also get the gate of :mod:`webhook.policy.gate` in front of their RBAC filters, and
their TCP proxy connects to the app only once the caller's TLS handshake is done: a denied
caller is refused before the app is connected (a server-first app's greeting never reaches
it). The gate's decisions are counted per policy by a stats access log,
``sidemesh_authz.tcp_denied.policy.<ns/name>`` and ``sidemesh_authz.tcp_audit.policy.<ns/name>``
(Prometheus: a ``policy`` label), and logged::

    sidemesh-authz audit tcp spiffe://…/sa/other port=9000 demo/watch-other
"""

from __future__ import annotations

import copy
from typing import Any, Final

from webhook.policy.compiler import ECDS_NAMES, HTTP_RBAC, TCP_RBAC
from webhook.policy.gate import AUDIT_KEY, DENIED_KEY, GATE, GATE_TYPE
from webhook.ratelimit.compiler import SLOTS

__all__ = ["DENIED_BODY", "EXTENSION_CONFIG", "with_authz"]

EXTENSION_CONFIG: Final = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
DENIED_BODY: Final = "access denied: %RESPONSE_CODE_DETAILS%\n"
_HCM: Final = "envoy.filters.network.http_connection_manager"
_TCP_PROXY: Final = "envoy.filters.network.tcp_proxy"
_ADS: Final = {"ads": {}, "resource_api_version": "V3"}
_T_STDOUT: Final = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
_T_CEL: Final = (
    "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter"
)
_DENIED_HTTP: Final = (
    "sidemesh-authz denied http %DOWNSTREAM_PEER_URI_SAN% %REQ(:METHOD)% %REQ(:PATH)% "
    "port=%DOWNSTREAM_LOCAL_PORT% %RESPONSE_CODE_DETAILS%\n"
)
_AUDITED: Final = (
    "sidemesh-authz audit http %DOWNSTREAM_PEER_URI_SAN% %REQ(:METHOD)% %REQ(:PATH)% "
    "port=%DOWNSTREAM_LOCAL_PORT% "
    "%DYNAMIC_METADATA(envoy.filters.http.rbac:audit.shadow_effective_policy_id)%\n"
)
_AUDIT_CEL: Final = (
    "metadata.filter_metadata['envoy.filters.http.rbac']['audit.shadow_engine_result'] == 'denied'"
)
_DENIED_TCP: Final = (
    "sidemesh-authz denied tcp %DOWNSTREAM_PEER_URI_SAN% port=%DOWNSTREAM_LOCAL_PORT% "
    "%CONNECTION_TERMINATION_DETAILS%\n"
)


def _denial_log(layer: str, audit: bool = False) -> dict[str, Any]:
    """A stdout access log of what the RBAC filters denied (``audit``: what AUDIT policies
    matched), nothing else."""
    attribute = "response.code_details" if layer == "http" else "connection.termination_details"
    expression = _AUDIT_CEL if audit else f"{attribute}.startsWith('rbac_access_denied')"
    line = _AUDITED if audit else _DENIED_HTTP if layer == "http" else _DENIED_TCP
    return {
        "name": "envoy.access_loggers.stdout",
        "filter": {
            "extension_filter": {
                "name": "envoy.access_loggers.extension_filters.cel",
                "typed_config": {
                    "@type": _T_CEL,
                    "expression": expression,
                },
            }
        },
        "typed_config": {
            "@type": _T_STDOUT,
            "log_format": {"text_format_source": {"inline_string": line}},
        },
    }


_T_STATS: Final = "type.googleapis.com/envoy.extensions.access_loggers.stats.v3.Config"
_GATE_LOG: Final = {
    DENIED_KEY: "sidemesh-authz denied tcp %DOWNSTREAM_PEER_URI_SAN% port=%DOWNSTREAM_LOCAL_PORT% "
    f"rbac_access_denied_matched_policy[%FILTER_STATE({DENIED_KEY}:PLAIN)%]\n",
    AUDIT_KEY: "sidemesh-authz audit tcp %DOWNSTREAM_PEER_URI_SAN% port=%DOWNSTREAM_LOCAL_PORT% "
    f"%FILTER_STATE({AUDIT_KEY}:PLAIN)%\n",
}
_GATE_STAT: Final = {DENIED_KEY: "tcp_denied", AUDIT_KEY: "tcp_audit"}


def _when_set(key: str) -> dict[str, Any]:
    """An access-log filter: only connections the gate put ``key`` on."""
    return {
        "extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {"@type": _T_CEL, "expression": f"'{key}' in filter_state"},
        }
    }


def _gate_logs() -> list[dict[str, Any]]:
    """Per decision of the gate: a counter per policy, and a line on standard output."""
    out = []
    for key in (DENIED_KEY, AUDIT_KEY):
        tag = {"name": "policy", "value_format": f"%FILTER_STATE({key}:PLAIN)%"}
        counter = {"stat": {"name": _GATE_STAT[key], "tags": [tag]}, "value_fixed": 1}
        out.append(
            {
                "name": "envoy.access_loggers.stats",
                "filter": _when_set(key),
                "typed_config": {
                    "@type": _T_STATS,
                    "stats_scope": {"prefix": "sidemesh_authz"},
                    "counters": [counter],
                },
            }
        )
        out.append(
            {
                "name": "envoy.access_loggers.stdout",
                "filter": _when_set(key),
                "typed_config": {
                    "@type": _T_STDOUT,
                    "log_format": {"text_format_source": {"inline_string": _GATE_LOG[key]}},
                },
            }
        )
    return out


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
                logs = [_denial_log("http"), _denial_log("http", audit=True)]
                hcm["access_log"] = [*hcm.get("access_log", []), *logs]
                break
            if f.get("name") == _TCP_PROXY:
                tcp = f["typed_config"]
                tcp["access_log"] = [*tcp.get("access_log", []), _denial_log("tcp"), *_gate_logs()]
                # The app is connected once the caller is known (and the gate has decided).
                tcp["upstream_connect_mode"] = "ON_DOWNSTREAM_TLS_HANDSHAKE"
                tcp["max_early_data_bytes"] = 0
                gate = _ref(GATE, GATE_TYPE)
                filters[index:index] = [gate, *(_ref(n, TCP_RBAC) for n in ECDS_NAMES["tcp"])]
                break
    return out
