"""Traces: every sidecar's HTTP connection managers start or join a W3C trace and export their
spans over OTLP/gRPC to the mesh's collector (``telemetry.tracing_collector``).

Envoy's OpenTelemetry tracer does it all: the client's sidecar (outbound) starts a trace when
the request carries no ``traceparent`` (``tracing_sampling`` percent of them) or joins the one
it carries, and sends the request on with its own span as the parent; the server's sidecar
(inbound) joins that trace and hands the app a ``traceparent`` naming its span. When the app
copies that header onto the calls it makes, the next hop joins the same trace. Each sidecar
reports itself as service ``<workload>.<namespace>``: Envoy's environment resource detector
reads it from ``OTEL_RESOURCE_ATTRIBUTES``, which the agent sets (so the listeners do not name
the workload).

Sampling is decided once, by whoever starts the trace, and travels with it: Envoy keeps its
decision in the request id (``x-request-id``), so tracing turns on request ids, and the server
side keeps the id it is given.
"""

from __future__ import annotations

from typing import Any, Final

from webhook.config import TelemetryConfig

__all__ = ["COLLECTOR_CLUSTER", "collector_cluster", "http_tracing"]

_TYPE = "@type"
_T_OTEL = "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig"
_T_ENV_DETECTOR = (
    "type.googleapis.com/envoy.extensions.tracers.opentelemetry.resource_detectors.v3"
    ".EnvironmentResourceDetectorConfig"
)
#: The service name of spans from a sidecar started without the agent's environment.
_FALLBACK_SERVICE: Final = "sidemesh-proxy"
_T_HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
#: The cluster of the OTLP collector, in every sidecar when tracing is on.
COLLECTOR_CLUSTER: Final = "sidemesh_otlp"


def collector_cluster(telemetry: TelemetryConfig) -> dict[str, Any] | None:
    """The collector's cluster (None: tracing off). A DNS name is resolved by Envoy."""
    if not telemetry.tracing_collector:
        return None
    host, _, port = telemetry.tracing_collector.rpartition(":")
    host = host.strip("[]")
    return {
        "name": COLLECTOR_CLUSTER,
        "type": "STRICT_DNS",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": COLLECTOR_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": host, "port_value": int(port)}
                                }
                            }
                        }
                    ]
                }
            ],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                _TYPE: _T_HTTP_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    }


def http_tracing(telemetry: TelemetryConfig, hcm: dict[str, Any], *, inbound: bool) -> None:
    """Turn tracing on in one connection manager's config (``hcm``, modified in place)."""
    if not telemetry.tracing_collector:
        return
    hcm["tracing"] = {
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                _TYPE: _T_OTEL,
                "grpc_service": {
                    "envoy_grpc": {"cluster_name": COLLECTOR_CLUSTER},
                    "timeout": "1s",
                },
                "service_name": _FALLBACK_SERVICE,
                "resource_detectors": [
                    {
                        "name": "envoy.tracers.opentelemetry.resource_detectors.environment",
                        "typed_config": {_TYPE: _T_ENV_DETECTOR},
                    }
                ],
            },
        },
        "random_sampling": {"value": telemetry.tracing_sampling},
        "spawn_upstream_span": False,
    }
    hcm["generate_request_id"] = True
    if inbound:
        hcm["preserve_external_request_id"] = True
