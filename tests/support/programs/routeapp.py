"""The test app of the traffic-rules lab (runs under the venv's interpreter: grpcio).

``serve PORT``  an HTTP/1.1 keep-alive server; every answer is one JSON line naming the replica
    (``POD_NAME``) and the path. Paths that misbehave on purpose:
    ``/flaky``          every other request of this process answers 503 (exactly half fail);
    ``/slow/MS``        answers after MS milliseconds;
    ``/slow-odd/MS``    every other request of this process answers after MS milliseconds;
    with ``FAIL=1`` in the environment every request answers 503 (a broken replica).
``serve-grpc PORT``  a gRPC server: any method answers its replica's name (JSON bytes).
``load HOST PORT N [options]``  N requests over ``--concurrency`` keep-alive connections;
    prints one JSON line: statuses, answers per replica, latency percentiles, and with
    ``--vary-header NAME:K`` which replicas answered each of K values of header NAME.
``get HOST PORT PATH [NAME:VALUE...]``  one request with those headers; prints the status, the
    response headers and the answer (which echoes the ``x-`` request headers the app saw).
``grpc-count HOST PORT N METHOD``  N unary calls on one channel: answers per replica.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from concurrent import futures
from typing import Any

_COUNTERS: Counter[str] = Counter()
_TASKS: set[asyncio.Future[None]] = set()


class HttpApp(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, rest = self.buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            path = [*lines[0].split(" "), "", ""][1]
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0") or 0)
            if len(rest) < length:
                return
            self.buf = rest[length:]
            task = asyncio.ensure_future(self.respond(path, headers))
            _TASKS.add(task)  # keep a reference until it is done
            task.add_done_callback(_TASKS.discard)

    async def respond(self, path: str, headers: dict[str, str]) -> None:
        status = "200 OK"
        if os.environ.get("FAIL") == "1":
            status = "503 Service Unavailable"
        elif path == "/flaky":
            _COUNTERS[path] += 1
            if _COUNTERS[path] % 2:
                status = "503 Service Unavailable"
        elif path.startswith("/slow/"):
            await asyncio.sleep(int(path.rsplit("/", 1)[1]) / 1000)
        elif path.startswith("/slow-odd/"):
            _COUNTERS["/slow-odd"] += 1
            if _COUNTERS["/slow-odd"] % 2:
                await asyncio.sleep(int(path.rsplit("/", 1)[1]) / 1000)
        seen = {k: v for k, v in headers.items() if k.startswith("x-") and k != "x-request-id"}
        body = json.dumps({"pod": os.environ.get("POD_NAME"), "path": path, "headers": seen})
        data = body.encode() + b"\n"
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        )
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(head.encode() + data)


async def _serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(HttpApp, "0.0.0.0", port, reuse_address=True)
    print("listening", flush=True)
    await asyncio.Event().wait()


def _serve_grpc(port: int) -> None:
    import grpc

    pod = os.environ.get("POD_NAME", "")

    def handle(request: bytes, context: Any) -> bytes:
        return json.dumps({"pod": pod}).encode()

    class Generic(grpc.GenericRpcHandler):  # type: ignore[misc]
        def service(self, details: Any) -> Any:
            return grpc.unary_unary_rpc_method_handler(handle)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((Generic(),))
    server.add_insecure_port(f"0.0.0.0:{port}")
    server.start()
    print("listening", flush=True)
    server.wait_for_termination()


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _load(args: argparse.Namespace) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    pods: Counter[str] = Counter()
    by_value: dict[str, Counter[str]] = {}
    overloaded = 0
    latencies: list[float] = []
    lock = threading.Lock()
    jobs = iter(range(args.n))
    vary_name, _, vary_count = (args.vary_header or ":0").partition(":")

    def worker() -> None:
        nonlocal overloaded
        conn = http.client.HTTPConnection(args.host, args.port, timeout=args.timeout)
        while True:
            with lock:
                i = next(jobs, None)
            if i is None:
                break
            headers = dict(h.split(":", 1) for h in args.header)
            value = ""
            if vary_name:
                value = f"user-{i % int(vary_count)}"
                headers[vary_name] = value
            start = time.monotonic()
            try:
                conn.request("GET", args.path, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                code = str(resp.status)
                flag = resp.getheader("x-envoy-overloaded") is not None
            except (OSError, http.client.HTTPException) as exc:
                code, body, flag = type(exc).__name__, b"", False
                conn.close()
                conn = http.client.HTTPConnection(args.host, args.port, timeout=args.timeout)
            took = (time.monotonic() - start) * 1000
            pod = ""
            if body.startswith(b"{"):
                pod = str(json.loads(body).get("pod"))
            with lock:
                statuses[code] += 1
                latencies.append(took)
                overloaded += flag
                if pod:
                    pods[pod] += 1
                    if value:
                        by_value.setdefault(value, Counter())[pod] += 1
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "statuses": dict(statuses),
        "pods": dict(pods),
        "overloaded": overloaded,
        "ms": {
            "p50": round(_percentile(latencies, 0.5), 1),
            "p90": round(_percentile(latencies, 0.9), 1),
            "p99": round(_percentile(latencies, 0.99), 1),
            "max": round(max(latencies, default=0.0), 1),
            "mean": round(statistics.fmean(latencies), 1) if latencies else 0.0,
        },
        "by_value": {k: dict(v) for k, v in sorted(by_value.items())},
    }


def _grpc_count(host: str, port: int, n: int, method: str) -> dict[str, Any]:
    import grpc

    pods: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        call = channel.unary_unary(method)
        for _ in range(n):
            try:
                pods[json.loads(call(b"{}", timeout=5))["pod"]] += 1
            except grpc.RpcError as exc:
                errors[str(exc.code())] += 1
    return {"pods": dict(pods), "errors": dict(errors)}


def main(argv: list[str]) -> None:
    cmd, rest = argv[0], argv[1:]
    if cmd == "serve":
        asyncio.run(_serve(int(rest[0])))
    elif cmd == "serve-grpc":
        _serve_grpc(int(rest[0]))
    elif cmd == "load":
        p = argparse.ArgumentParser(prog="routeapp load")
        p.add_argument("host")
        p.add_argument("port", type=int)
        p.add_argument("n", type=int)
        p.add_argument("--path", default="/")
        p.add_argument("--concurrency", type=int, default=1)
        p.add_argument("--header", action="append", default=[])
        p.add_argument("--vary-header", default="")
        p.add_argument("--timeout", type=float, default=10.0)
        print(json.dumps(_load(p.parse_args(rest))), flush=True)
    elif cmd == "get":
        conn = http.client.HTTPConnection(rest[0], int(rest[1]), timeout=10)
        conn.request("GET", rest[2], headers=dict(h.split(":", 1) for h in rest[3:]))
        resp = conn.getresponse()
        body = resp.read()
        answer = json.loads(body) if body.startswith(b"{") else {"text": body.decode()}
        out = {"status": resp.status, "headers": {k.lower(): v for k, v in resp.getheaders()}}
        print(json.dumps({**out, "answer": answer}), flush=True)
    elif cmd == "grpc-count":
        result = _grpc_count(rest[0], int(rest[1]), int(rest[2]), rest[3])
        print(json.dumps(result), flush=True)
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv[1:])
