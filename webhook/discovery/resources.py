"""Envoy JSON dicts → the upb-backed messages of ``xds-protos``, serialised once, with a
content hash for a version.

``SerializeToString(deterministic=True)`` matters: without it map fields come out in varying
order, the hash changes with nothing changed, and every proxy gets a spurious push.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Any, Final

# The typed_config messages our resources name must be in the default pool for
# json_format to resolve their "@type" (each import registers its file).
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import extension_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.rbac.v3 import rbac_pb2  # noqa: F401
from envoy.config.route.v3 import route_pb2
from envoy.config.trace.v3 import opentelemetry_pb2  # noqa: F401
from envoy.extensions.access_loggers.filters.cel.v3 import cel_pb2  # noqa: F401
from envoy.extensions.access_loggers.stats.v3 import stats_pb2  # noqa: F401
from envoy.extensions.access_loggers.stream.v3 import stream_pb2 as access_stream_pb2  # noqa: F401
from envoy.extensions.filters.http.fault.v3 import fault_pb2  # noqa: F401
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2  # noqa: F401
from envoy.extensions.filters.http.ratelimit.v3 import rate_limit_pb2  # noqa: F401
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.listener.http_inspector.v3 import http_inspector_pb2  # noqa: F401
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2  # noqa: F401
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as tcp_rbac_pb2  # noqa: F401
from envoy.extensions.filters.network.set_filter_state.v3 import (  # noqa: F401
    set_filter_state_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2  # noqa: F401
from envoy.extensions.rate_limit_descriptors.expr.v3 import expr_pb2  # noqa: F401
from envoy.extensions.rbac.audit_loggers.stream.v3 import stream_pb2  # noqa: F401
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2  # noqa: F401
from envoy.extensions.tracers.opentelemetry.resource_detectors.v3 import (  # noqa: F401
    environment_resource_detector_pb2,
)
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from google.protobuf import json_format

from webhook.discovery.compiler import CLUSTER, ENDPOINTS, LISTENER, ROUTE
from webhook.discovery.protos import POOL
from webhook.errors import SidemeshError
from webhook.policy.envoy import EXTENSION_CONFIG

__all__ = ["Encoded", "decode", "delta_response", "encode", "version_of"]

_MESSAGES: Final[dict[str, Any]] = {
    CLUSTER: cluster_pb2.Cluster,
    ENDPOINTS: endpoint_pb2.ClusterLoadAssignment,
    LISTENER: listener_pb2.Listener,
    ROUTE: route_pb2.RouteConfiguration,
    EXTENSION_CONFIG: extension_pb2.TypedExtensionConfig,
}


class Encoded:
    """One resource as sent: its serialised bytes and their content-hash version."""

    __slots__ = ("_wrapped", "body", "version")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.version = version_of(body)
        self._wrapped: dict[str, bytes] = {}

    def wrapped(self, name: str, type_url: str) -> bytes:
        """The serialised ``Resource`` (name, version, Any) that carries it, already framed as
        an entry of ``DeltaDiscoveryResponse.resources``, made once: a response to any number
        of proxies is then a join of cached bytes."""
        out = self._wrapped.get(name)
        if out is None:
            any_msg = _field(1, type_url.encode()) + _field(2, self.body)
            resource = (
                _field(3, name.encode()) + _field(1, self.version.encode()) + _field(2, any_msg)
            )
            out = _field(2, resource)
            self._wrapped[name] = out
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Encoded) and other.body == self.body

    def __hash__(self) -> int:
        return hash(self.body)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (strings, bytes, sub-messages)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def delta_response(
    type_url: str,
    nonce: str,
    system_version: str,
    resources: list[bytes],
    removed: list[str],
) -> bytes:
    """A serialised ``DeltaDiscoveryResponse`` from ``Resource`` entries as
    :meth:`Encoded.wrapped` frames them (protobuf messages concatenate: a repeated field is its
    elements one after another)."""
    parts = [_field(1, system_version.encode()), *resources]
    parts.append(_type_field(type_url))
    parts.append(_field(5, nonce.encode()))
    parts += [_field(6, n.encode()) for n in removed]
    return b"".join(parts)


# Keyed by value; one entry per xDS type the control plane serves.
@lru_cache(maxsize=16)
def _type_field(type_url: str) -> bytes:
    return _field(4, type_url.encode())


def version_of(body: bytes) -> str:
    return hashlib.blake2b(body, digest_size=8).hexdigest()


def encode(type_url: str, resource: dict[str, Any]) -> Encoded:
    """Parse an Envoy JSON dict into its message and serialise it deterministically."""
    try:
        message = json_format.ParseDict(resource, _MESSAGES[type_url](), descriptor_pool=POOL)
    except json_format.ParseError as exc:
        # A compiler bug, never user input: say which resource.
        name = resource.get("name") or resource.get("cluster_name")
        raise SidemeshError(f"cannot encode {type_url} {name!r}: {exc}") from None
    return Encoded(message.SerializeToString(deterministic=True))


def decode(type_url: str, enc: Encoded) -> dict[str, Any]:
    """An encoded resource back to Envoy JSON (debug output, aliases)."""
    msg = _MESSAGES[type_url]()
    msg.ParseFromString(enc.body)
    out: dict[str, Any] = json_format.MessageToDict(
        msg, preserving_proto_field_name=True, descriptor_pool=POOL
    )
    return out
