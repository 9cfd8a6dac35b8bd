"""grpcio's asyncio server against grpclib, serving delta ADS the way the control plane does.

Each server runs alone in its own process and serves ``DeltaAggregatedResources``: for every
request on a stream (the first, then each ACK) it sends the next of ``--pushes`` pre-serialised
``DeltaDiscoveryResponse`` messages of ``--resources`` clusters each — bytes handed to the
server as they are, as the control plane does. ``--streams`` streams come from ``--procs``
grpcio client processes, ACK every response, then stay open (a stream that fails is opened
again after a second, as Envoy does). Figures per server:

* server CPU (user + system, from /proc) per MB pushed, and per response;
* wall time until every stream has ACKed every push;
* server RSS with every stream still open.

Plaintext on 127.0.0.1 for both (TLS costs the same in both: both hand it to a C library).

    .venv/bin/python tests/bench/bench_grpc_servers.py [--streams 2000] [--pushes 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent.parent
REPO = TESTS.parent
sys.path.insert(0, str(REPO))

from tests.bench.results import write_results  # noqa: E402

METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


def payload(resources: int) -> bytes:
    """One response of ``resources`` real, encoded clusters (as the compiler makes them)."""
    from webhook.dataplane.bootstrap import BootstrapOptions
    from webhook.discovery.clusters import build_cluster
    from webhook.discovery.model import Endpoint, Service, ServicePort
    from webhook.discovery.resources import delta_response, encode

    opts = BootstrapOptions("p", "bench", "sa")
    entries = []
    for i in range(resources):
        port = ServicePort("http", 80, "http")
        svc = Service("bench", f"svc{i}", (f"10.96.{i // 250}.{i % 250 + 1}",), (port,))
        eps = [Endpoint(f"10.1.0.{i % 250 + 1}", 8080, f"spiffe://cluster.local/ns/bench/sa/s{i}")]
        entries.append(encode(CLUSTER, build_cluster(svc, port, eps, opts)).wrapped(
            svc.cluster_name(port), CLUSTER))  # fmt: skip
    return delta_response(CLUSTER, "1", "1", entries, [])


# --- the two servers ------------------------------------------------------------------------


def serve_grpcio(port: int, body: bytes, pushes: int, ready: Any) -> None:
    import grpc
    from envoy.service.discovery.v3 import discovery_pb2

    async def handler(requests: Any, context: Any) -> Any:
        sent = 0
        async for _request in requests:
            if sent < pushes:
                sent += 1
                yield body

    async def main() -> None:
        server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 1 << 20)])
        rpc = grpc.stream_stream_rpc_method_handler(
            handler,
            request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
            response_serializer=bytes,
        )
        service, method = METHOD.rsplit("/", 1)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service.lstrip("/"), {method: rpc}),)
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(main())


def serve_grpclib(port: int, body: bytes, pushes: int, ready: Any) -> None:
    from envoy.service.discovery.v3 import discovery_pb2
    from grpclib.const import Cardinality, Handler
    from grpclib.encoding.base import CodecBase
    from grpclib.server import Server

    class RawCodec(CodecBase):
        """Responses go out as the bytes they already are."""

        __content_subtype__ = "proto"

        def encode(self, message: Any, message_type: Any) -> bytes:
            return message if isinstance(message, bytes) else bytes(message.SerializeToString())

        def decode(self, data: bytes, message_type: Any) -> Any:
            return message_type.FromString(data)

    class Ads:
        async def handle(self, stream: Any) -> None:
            sent = 0
            async for _request in stream:
                if sent < pushes:
                    sent += 1
                    await stream.send_message(body)

        def __mapping__(self) -> dict[str, Any]:
            return {
                METHOD: Handler(
                    self.handle,
                    Cardinality.STREAM_STREAM,
                    discovery_pb2.DeltaDiscoveryRequest,
                    bytes,
                )
            }

    async def main() -> None:
        server = Server([Ads()], codec=RawCodec())
        await server.start("127.0.0.1", port)
        ready.set()
        await server.wait_closed()

    asyncio.run(main())


# --- clients --------------------------------------------------------------------------------


def clients(port: int, count: int, pushes: int, done: Any, hold: Any) -> None:
    import grpc
    from envoy.service.discovery.v3 import discovery_pb2 as pb

    async def one(channel: Any) -> None:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        await queue.put(pb.DeltaDiscoveryRequest(type_url=CLUSTER))

        async def requests() -> Any:
            while True:
                yield await queue.get()

        call = channel.stream_stream(
            METHOD,
            request_serializer=pb.DeltaDiscoveryRequest.SerializeToString,
            response_deserializer=bytes,
        )(requests())
        got = 0
        async for _resp in call:
            got += 1
            await queue.put(pb.DeltaDiscoveryRequest(type_url=CLUSTER, response_nonce=str(got)))
            if got == pushes:
                done.put(1)
                await asyncio.Event().wait()  # stay open

    async def reconnecting(channel: Any) -> None:
        """Like Envoy: a stream that fails (a connect refused or timed out while thousands
        start at once) is opened again after a pause; each counts once, when complete."""
        while True:
            try:
                await one(channel)
            except grpc.aio.AioRpcError:
                await asyncio.sleep(1.0)

    async def main() -> None:
        opts = [("grpc.max_receive_message_length", 256 << 20)]
        # A channel per 100 streams: HTTP/2 multiplexing, as many sidecars never share one.
        channels = [
            grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[*opts, ("x", i)])
            for i in range(-(-count // 100))
        ]
        tasks = [asyncio.ensure_future(reconnecting(channels[i // 100])) for i in range(count)]
        while not hold.is_set():
            await asyncio.sleep(0.2)
        for t in tasks:
            t.cancel()

    asyncio.run(main())


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(name: str, target: Any, args: argparse.Namespace, body: bytes) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    port, ready, hold, done = _free_port(), ctx.Event(), ctx.Event(), ctx.Queue()
    server = ctx.Process(target=target, args=(port, body, args.pushes, ready))
    server.start()
    pid = server.pid
    assert pid is not None
    try:
        if not ready.wait(30):
            raise TimeoutError(f"{name} never listened")
        time.sleep(0.5)
        cpu0, start = _cpu_s(pid), time.perf_counter()
        per = -(-args.streams // args.procs)
        procs = []
        for k in range(args.procs):
            count = min(per, args.streams - k * per)
            if count > 0:
                p = ctx.Process(target=clients, args=(port, count, args.pushes, done, hold))
                p.start()
                procs.append(p)
        for _ in range(args.streams):
            done.get(timeout=600)
        wall = time.perf_counter() - start
        cpu = _cpu_s(pid) - cpu0
        rss = _rss_mib(pid)
        hold.set()
        for p in procs:
            p.join(30)
    finally:
        server.kill()
        server.join(10)
    pushed_mb = len(body) * args.pushes * args.streams / 1e6
    return {
        "server": name,
        "streams": args.streams,
        "responses": args.pushes * args.streams,
        "pushed_mb": round(pushed_mb, 1),
        "wall_s": round(wall, 2),
        "server_cpu_s": round(cpu, 2),
        "cpu_ms_per_mb": round(cpu * 1000 / pushed_mb, 2),
        "cpu_us_per_response": round(cpu * 1e6 / (args.pushes * args.streams), 1),
        "server_rss_mib_all_streams_open": round(rss, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--pushes", type=int, default=5)
    parser.add_argument("--resources", type=int, default=100, help="clusters per response")
    parser.add_argument("--procs", type=int, default=4, help="client processes")
    args = parser.parse_args()
    body = payload(args.resources)
    results = [
        run("grpcio (asyncio)", serve_grpcio, args, body),
        run("grpclib", serve_grpclib, args, body),
    ]
    out = {"response_bytes": len(body), "results": results}
    print(json.dumps(out, indent=1))
    write_results("grpc_servers", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
