"""Rate-limit policies → the two rate-limit filter configs of a workload's inbound HTTP side.

Pure. Like the access-policy filters, both are delivered by extension config discovery under
fixed names, after the RBAC filters (a denied request spends no budget):

===============================  ==================================================================
``sidemesh.ratelimit.local``     Envoy's local rate limit: one token bucket per Local limit, in
                                 this sidecar only
``sidemesh.ratelimit.global``    Envoy's rate limit filter asking the rate-limit service
                                 (``sidemesh ratelimit``) about every request a Global limit
                                 covers; a disabled local rate limit when there is none
===============================  ==================================================================

Descriptors. Each limit makes one descriptor, built by the sidecar per request:
``("policy", "ns/name")`` (the limit's name: the service reads the policy itself and takes
its size from there), ``("caller", <SPIFFE id>)`` when ``perCaller`` (the verified peer
certificate's URI SAN, ``plaintext`` without one), and ``("match", "yes")`` when the limit
matches paths or methods (no match: no descriptor, no limit).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

from webhook import names
from webhook.dataplane import bootstrap as bs
from webhook.ratelimit.model import UNITS, Limit, RateLimitPolicy

__all__ = [
    "CLUSTER",
    "DOMAIN",
    "GLOBAL_RL",
    "LOCAL_RL",
    "SLOTS",
    "compile_limits",
    "limits_for",
    "service_cluster",
    "service_identity",
]

LOCAL_RL: Final = (
    "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
)
GLOBAL_RL: Final = "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit"
_EXPR: Final = "type.googleapis.com/envoy.extensions.rate_limit_descriptors.expr.v3.Descriptor"
_HTTP_OPTIONS: Final = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
#: ECDS name → the filter types that slot accepts.
SLOTS: Final = {
    "sidemesh.ratelimit.local": (LOCAL_RL,),
    "sidemesh.ratelimit.global": (GLOBAL_RL, LOCAL_RL),
}
#: The rate-limit service's cluster in every sidecar (when discovery knows its address).
CLUSTER: Final = "sidemesh_ratelimit"
DOMAIN: Final = "sidemesh"
#: The rate-limit service's service account (its SPIFFE id names it).
SERVICE_ACCOUNT: Final = "sidemesh-ratelimit"
#: The caller: the verified certificate's URI SAN; one shared budget for plaintext callers.
_CALLER_CEL: Final = "connection.mtls ? connection.uri_san_peer_certificate : 'plaintext'"
_MAX: Final = 4294967295
_PERCENT_100: Final = {"numerator": 100, "denominator": "HUNDRED"}


def limits_for(
    policies: Iterable[RateLimitPolicy], namespace: str, labels: Mapping[str, str]
) -> tuple[RateLimitPolicy, ...]:
    return tuple(p for p in policies if p.selects(namespace, labels))


def compile_limits(
    selected: Iterable[RateLimitPolicy], *, service: bool, timeout: str = "0.5s"
) -> dict[str, dict[str, Any]]:
    """ECDS name → filter config. ``service``: whether sidecars have the rate-limit service's
    cluster (without it Global limits cannot be enforced and the slot stays disabled)."""
    local: list[tuple[str, Limit]] = []
    global_: list[tuple[str, Limit]] = []
    fail_open = True
    for policy in selected:
        for limit_id, limit in zip(policy.limit_ids(), policy.limits, strict=True):
            (local if limit.scope == "Local" else global_).append((limit_id, limit))
            if limit.scope == "Global":
                fail_open = fail_open and policy.fail_open
    out = {"sidemesh.ratelimit.local": _local(local)}
    if global_ and service:
        out["sidemesh.ratelimit.global"] = _global(global_, fail_open, timeout)
    else:
        out["sidemesh.ratelimit.global"] = _disabled("sidemesh_global_ratelimit_off")
    return out


def service_identity(trust_domain: str) -> str:
    """The SPIFFE id the service's certificate carries (and sidecars verify): its service
    account in the control-plane namespace."""
    return names.spiffe_id(trust_domain, names.CONTROL_PLANE_NAMESPACE, SERVICE_ACCOUNT)


def service_cluster(address: str, opts: bs.BootstrapOptions, identity: str) -> dict[str, Any]:
    """The cluster every sidecar reaches the rate-limit service by (``host:port``, gRPC over
    mTLS): the workload's own certificate (SDS, as on every mesh cluster), and a server that
    must chain to the mesh root *and* be exactly ``identity`` (the service's SPIFFE id), so
    nothing else in the mesh can pose as it."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"rate-limit service address {address!r}: want HOST:PORT")
    ctx = bs._common_tls(opts, ["h2"])
    ctx["combined_validation_context"]["default_validation_context"] = {
        "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": identity}}]
    }
    tls: dict[str, Any] = {bs._TYPE: bs._T_TLS_UP, "common_tls_context": ctx}
    if not _is_ip(host.strip("[]")):
        tls["sni"] = host
    return {
        "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": tls},
        "name": CLUSTER,
        "type": "STRICT_DNS",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": host.strip("[]"),
                                        "port_value": int(port),
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
        "typed_extension_protocol_options": {
            _HTTP_OPTIONS: {
                "@type": f"type.googleapis.com/{_HTTP_OPTIONS}",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    }


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _disabled(prefix: str) -> dict[str, Any]:
    # No filter_enabled: the filter runs at 0 %, a no-op.
    return {"@type": LOCAL_RL, "stat_prefix": prefix}


def _bucket(requests: int, per: str) -> dict[str, Any]:
    return {"max_tokens": requests, "tokens_per_fill": requests, "fill_interval": f"{UNITS[per]}s"}


def _match(limit: Limit) -> list[dict[str, Any]]:
    headers = []
    if limit.paths:
        alternatives = "|".join(
            re.escape(p[:-1]) + ".*" if p.endswith("*") else re.escape(p) for p in limit.paths
        )
        # The query string is not part of the path a limit names.
        regex = f"^({alternatives})(\\?.*)?$"
        headers.append({"name": ":path", "string_match": {"safe_regex": {"regex": regex}}})
    if limit.methods:
        regex = "^(" + "|".join(limit.methods) + ")$"
        headers.append({"name": ":method", "string_match": {"safe_regex": {"regex": regex}}})
    if not headers:
        return []
    return [
        {
            "header_value_match": {
                "descriptor_key": "match",
                "descriptor_value": "yes",
                "expect_match": True,
                "headers": headers,
            }
        }
    ]


def _key(key: str, value: str) -> dict[str, Any]:
    return {"generic_key": {"descriptor_key": key, "descriptor_value": value}}


def _local(limits: list[tuple[str, Limit]]) -> dict[str, Any]:
    if not limits:
        return _disabled("sidemesh_local_ratelimit")
    descriptors, rate_limits = [], []
    for limit_id, limit in limits:
        entries = [{"key": "policy", "value": limit_id}]
        if limit.paths or limit.methods:
            entries.append({"key": "match", "value": "yes"})
        descriptors.append({"entries": entries, "token_bucket": _bucket(limit.requests, limit.per)})
        rate_limits.append({"actions": [_key("policy", limit_id), *_match(limit)]})
    return {
        "@type": LOCAL_RL,
        "stat_prefix": "sidemesh_local_ratelimit",
        # Requests no limit covers meet this bucket: it never runs dry.
        "token_bucket": {"max_tokens": _MAX, "tokens_per_fill": _MAX, "fill_interval": "1s"},
        "filter_enabled": {"default_value": _PERCENT_100, "runtime_key": "sidemesh.local_rl"},
        "filter_enforced": {"default_value": _PERCENT_100, "runtime_key": "sidemesh.local_rl_on"},
        "descriptors": descriptors,
        "rate_limits": rate_limits,
        "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
    }


def _global(limits: list[tuple[str, Limit]], fail_open: bool, timeout: str) -> dict[str, Any]:
    rate_limits = []
    for limit_id, limit in limits:
        actions = [_key("policy", limit_id)]
        if limit.per_caller:
            actions.append(
                {
                    "extension": {
                        "name": "envoy.rate_limit_descriptors.expr",
                        "typed_config": {
                            "@type": _EXPR,
                            "descriptor_key": "caller",
                            "text": _CALLER_CEL,
                        },
                    }
                }
            )
        rate_limits.append({"actions": [*actions, *_match(limit)]})
    return {
        "@type": GLOBAL_RL,
        "domain": DOMAIN,
        "stat_prefix": "sidemesh_global",
        "timeout": timeout,
        # Allow (fail open): a request passes when the service cannot answer; Deny: 503.
        "failure_mode_deny": not fail_open,
        "status_on_error": {"code": "ServiceUnavailable"},
        "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
        "rate_limit_service": {
            "grpc_service": {"envoy_grpc": {"cluster_name": CLUSTER}, "timeout": timeout},
            "transport_api_version": "V3",
        },
        "rate_limits": rate_limits,
    }
