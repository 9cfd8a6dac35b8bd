"""Delta ADS over mTLS with grpcio's asyncio server.

Every stream must present a workload certificate from the mesh CA: the proxy's identity is the
URI SAN of the *verified* peer certificate. ``node.id`` (``sidecar~<pod>.<namespace>``) only
says which pod of that identity is asking, and is checked against it: the namespace must be the
certificate's, and the pod must run as the certificate's service account. A proxy that lied in
``node.id`` could at most get the config of another pod with its own identity.

State of the world (``StreamAggregatedResources``) is refused: under it one endpoint change
re-sends every endpoint set to every proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from webhook.discovery.core import Discovery
from webhook.discovery.servingcert import (
    peer_spiffe_id,
    reloading_credentials,
    server_credentials,
)

__all__ = [
    "AdsService",
    "parse_node_id",
    "peer_spiffe_id",
    "reloading_credentials",
    "serve_ads",
    "server_credentials",
]

LOG = logging.getLogger("sidemesh.discovery")

#: How long a stream waits for its pod to appear in the model (a watch may lag the pod's start).
POD_WAIT_SECONDS = 30.0


def parse_node_id(node_id: str) -> tuple[str, str] | None:
    """``sidecar~<pod>.<namespace>`` → ``(namespace, pod)`` (namespaces have no dots)."""
    kind, _, rest = node_id.partition("~")
    pod, dot, namespace = rest.rpartition(".")
    if kind != "sidecar" or not dot or not pod or not namespace:
        return None
    return namespace, pod


def _identity_parts(spiffe_id: str, trust_domain: str) -> tuple[str, str] | None:
    prefix = f"spiffe://{trust_domain}/ns/"
    if not spiffe_id.startswith(prefix):
        return None
    parts = spiffe_id[len(prefix) :].split("/")
    if len(parts) != 3 or parts[1] != "sa" or not parts[0] or not parts[2]:
        return None
    return parts[0], parts[2]


class AdsService(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, discovery: Discovery) -> None:
        self.discovery = discovery

    async def StreamAggregatedResources(self, request_iterator: Any, context: Any) -> Any:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "sidemesh serves delta xDS only: set ads_config "
            "api_type DELTA_GRPC (the sidemesh bootstrap does)",
        )

    async def DeltaAggregatedResources(
        self, request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest], context: Any
    ) -> AsyncIterator[bytes]:
        d = self.discovery
        spiffe_id = peer_spiffe_id(context)
        ident = _identity_parts(spiffe_id or "", d.settings.trust_domain)
        if spiffe_id is None or ident is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"no SPIFFE id of trust domain {d.settings.trust_domain} in the client certificate",
            )
            return
        namespace, service_account = ident
        first = await request_iterator.__anext__()
        node = parse_node_id(first.node.id)
        if node is None or node[0] != namespace:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"node.id {first.node.id!r} is not sidecar~<pod>.{namespace} "
                f"(the namespace of {spiffe_id})",
            )
            return
        pod = await d.wait_for_pod(namespace, node[1], POD_WAIT_SECONDS)
        if pod is None or pod.service_account != service_account:
            why = "is unknown" if pod is None else f"runs as {pod.service_account}"
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"pod {namespace}/{node[1]} {why}, not as {spiffe_id}",
            )
            return
        conn = d.connect(spiffe_id, namespace, node[1], context.peer(), first.node.id)
        LOG.info(
            "proxy %s/%s connected as %s from %s", namespace, node[1], spiffe_id, context.peer()
        )
        reader = asyncio.ensure_future(self._read(conn, first, request_iterator))
        try:
            while True:
                resp = await conn.queue.get()
                if resp is None:
                    return
                yield resp
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            d.disconnect(conn)
            LOG.info("proxy %s/%s disconnected", namespace, node[1])

    async def _read(self, conn: Any, first: Any, requests: AsyncIterator[Any]) -> None:
        try:
            self.discovery.on_request(conn, first)
            async for req in requests:
                self.discovery.on_request(conn, req)
        except Exception as exc:  # the stream ended (or a bug): close it, never the server
            if not isinstance(exc, asyncio.CancelledError | grpc.aio.AioRpcError):
                LOG.exception("ADS stream of %s/%s failed", conn.namespace, conn.pod_name)
        finally:
            conn.queue.put_nowait(None)


async def serve_ads(discovery: Discovery, address: str, credentials: Any) -> grpc.aio.Server:
    """Start the ADS server on ``address`` (``host:port``); the caller stops it."""
    server = grpc.aio.server(
        options=[
            # Envoy keeps one long stream; let it ping to keep NATs and LBs from cutting it.
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.max_concurrent_streams", 1 << 20),
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", 16 << 20),
            # No bandwidth-delay probing: it sizes the window for what the server receives, and
            # a proxy only sends ACKs, but each probe is a PING out and a PING ACK back on every
            # stream after each push (a TLS record each way, in Envoy and here).
            ("grpc.http2.bdp_probe", 0),
        ]
    )
    service = AdsService(discovery)
    # Responses are assembled from cached bytes by the push engine: pass them through as they
    # are instead of letting the generated stub serialise a message again.
    handler = grpc.method_handlers_generic_handler(
        "envoy.service.discovery.v3.AggregatedDiscoveryService",
        {
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                service.DeltaAggregatedResources,
                request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                response_serializer=bytes,
            ),
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                service.StreamAggregatedResources,
                request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                response_serializer=discovery_pb2.DiscoveryResponse.SerializeToString,
            ),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {address} for xDS")
    await server.start()
    return server
