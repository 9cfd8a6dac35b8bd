"""A minimal OTLP/gRPC trace receiver for tests: the collector a sidecar exports spans to.

``python tests/support/otlp_receiver.py PORT FILE`` serves
``opentelemetry.proto.collector.trace.v1.TraceService/Export`` on 0.0.0.0:PORT (grpcio, the
OpenTelemetry protos that ship with ``xds-protos``: installing PyPI's ``opentelemetry-proto``
as well would overwrite the same module files) and appends one JSON line per span to FILE:
trace id, span id, parent span id, name, kind, the exporting service and the span's string
attributes. Prints ``listening`` when ready.
"""

from __future__ import annotations

import json
import sys
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

#: The generated module (untyped): its messages as Any.
svc: Any = trace_service_pb2

_LOCK = threading.Lock()


def spans_of(request: Any) -> list[dict[str, Any]]:
    out = []
    for resource_spans in request.resource_spans:
        attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
        # xds-protos ships an older copy of these protos: ``scope_spans`` was called
        # ``instrumentation_library_spans`` there (the same field number, the same wire form).
        scopes = getattr(resource_spans, "scope_spans", None)
        if scopes is None:
            scopes = resource_spans.instrumentation_library_spans
        for scope in scopes:
            for span in scope.spans:
                out.append(
                    {
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "name": span.name,
                        "kind": int(span.kind),
                        "service": attrs.get("service.name", ""),
                        "attributes": {
                            a.key: a.value.string_value
                            for a in span.attributes
                            if a.value.HasField("string_value")
                        },
                    }
                )
    return out


def serve(port: int, out: Path) -> None:
    def export(request: Any, context: grpc.ServicerContext) -> Any:
        lines = "".join(json.dumps(s) + "\n" for s in spans_of(request))
        with _LOCK, out.open("a") as f:
            f.write(lines)
        return svc.ExportTraceServiceResponse()

    handler = grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService",
        {
            "Export": grpc.unary_unary_rpc_method_handler(
                export,
                request_deserializer=svc.ExportTraceServiceRequest.FromString,
                response_serializer=svc.ExportTraceServiceResponse.SerializeToString,
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"0.0.0.0:{port}")
    server.start()
    print("listening", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    serve(int(sys.argv[1]), Path(sys.argv[2]))
