"""JSON access logs: one line per request (HTTP) or connection (TCP) on the proxy's stdout.

Envoy writes them itself (``envoy.access_loggers.stdout``), so the container runtime collects
them with the rest of the pod's logs. What a line holds (``-`` or null when it does not
apply):

==========================  ===============================================================
key                         value
==========================  ===============================================================
``start_time``              when the request (connection) began, RFC 3339
``reporter``                ``source`` (the caller's sidecar) or ``destination`` (the server's)
``source_*``, ``destination_*``  the same identities as the metrics: workload, namespace,
                            principal (both SPIFFE ids), the destination Service
``connection_security_policy``  ``mutual_tls`` or ``none``
``method`` ``path`` ``authority`` ``protocol``  the request (HTTP only)
``response_code`` ``grpc_status``  the answer (HTTP only)
``response_flags``          Envoy's failure flags (``UF`` upstream connect failure, ``UH`` no
                            healthy upstream, ``URX`` retries exhausted …), ``-`` when none
``response_code_details``   why Envoy answered what it did (HTTP only)
``duration_ms``             first byte in to last byte out
``upstream_service_time_ms``  first byte to the upstream to last byte back (HTTP only)
``bytes_received`` ``bytes_sent``  body bytes from and to the downstream
``filter_chain`` ``route``  which listener chain (mesh rule) and which route matched
``upstream_cluster`` ``upstream_host``  where it went
``traceparent``             the W3C trace context it carried (HTTP only)
==========================  ===============================================================

Sampling (:class:`~webhook.telemetry.settings.AccessLogPolicy`): failures are always written,
the rest at the policy's percentage, drawn independently per request (``runtime_filter`` with
``use_independent_randomness``: sidecars generate no request ids to sample on).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from webhook.telemetry.settings import AccessLogPolicy

__all__ = ["json_logger"]

_TYPE = "@type"
_T_STDOUT = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
#: Runtime key of the sampling percentage (unset: the compiled-in value applies).
_RUNTIME_KEY: Final = "sidemesh.access_log.sampling"

_COMMON: Final = {
    "start_time": "%START_TIME%",
    "response_flags": "%RESPONSE_FLAGS%",
    "duration_ms": "%DURATION%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "filter_chain": "%FILTER_CHAIN_NAME%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "upstream_host": "%UPSTREAM_HOST%",
}
_HTTP: Final = {
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "authority": "%REQ(:AUTHORITY)%",
    "protocol": "%PROTOCOL%",
    "response_code": "%RESPONSE_CODE%",
    "grpc_status": "%GRPC_STATUS%",
    "response_code_details": "%RESPONSE_CODE_DETAILS%",
    "upstream_service_time_ms": "%RESPONSE_DURATION%",
    "route": "%ROUTE_NAME%",
    "traceparent": "%REQ(TRACEPARENT)%",
}


def json_logger(
    protocol: str, identity: Mapping[str, str], policy: AccessLogPolicy
) -> dict[str, Any] | None:
    """The stdout JSON logger of one chain (None when the policy is ``off``). ``identity``:
    the per-chain identity fields, the same format strings the metrics' labels use."""
    if not policy.enabled:
        return None
    fields: dict[str, str] = {**_COMMON, **identity}
    if protocol == "http":
        fields.update(_HTTP)
    config: dict[str, Any] = {
        _TYPE: _T_STDOUT,
        "log_format": {"json_format": fields},
    }
    logger: dict[str, Any] = {"name": "envoy.access_loggers.stdout", "typed_config": config}
    sampled = _sampling_filter(protocol, policy.percent)
    if sampled is not None:
        logger["filter"] = sampled
    return logger


def _sampling_filter(protocol: str, percent: float) -> dict[str, Any] | None:
    if percent >= 100:
        return None
    failed: list[dict[str, Any]] = [{"response_flag_filter": {}}]
    if protocol == "http":
        failed.append(
            {
                "status_code_filter": {
                    "comparison": {
                        "op": "GE",
                        "value": {"default_value": 500, "runtime_key": f"{_RUNTIME_KEY}.status"},
                    }
                }
            }
        )
    if percent > 0:
        failed.append(
            {
                "runtime_filter": {
                    "runtime_key": _RUNTIME_KEY,
                    "percent_sampled": {
                        "numerator": round(percent * 10_000),
                        "denominator": "MILLION",
                    },
                    "use_independent_randomness": True,
                }
            }
        )
    return failed[0] if len(failed) == 1 else {"or_filter": {"filters": failed}}
