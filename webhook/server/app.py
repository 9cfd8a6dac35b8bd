"""The HTTPS edge: a FastAPI app around :func:`webhook.admission.review.review`, served by uvicorn.

Endpoints:

| method | path               | what                                                         |
|--------|--------------------|--------------------------------------------------------------|
| POST   | ``/mutate``        | AdmissionReview v1/v1beta1 → AdmissionReview (same version)  |
| GET    | ``/healthz``       | the process is alive                                         |
| GET    | ``/readyz``        | config loaded and a serving certificate in date (else 503)   |
| GET    | ``/metrics``       | Prometheus text (also on ``--metrics-port`` as plain HTTP)   |
| POST   | ``/v1/certificates``| the mini-CA, when its router is passed in (``ca.key`` present)|

The handler takes the raw body and parses it with orjson (FastAPI's ``Body(dict)`` cost a third
of the throughput) and runs the core inline on the event loop: a review is pure CPU for well
under a millisecond, so a thread hop would only add latency. ``POST /mutate`` (and the
benchmark's ``/noop``) is answered straight from the ASGI messages, ahead of FastAPI's
middleware, router and request objects, which cost more than the review itself (see
:class:`_App`); FastAPI still serves every other route and method.

Keep-alive: the API server keeps idle webhook connections for 90 s. If the server closed them
sooner, the API server could send a review on a connection the server is just closing, and a
POST is not retried — the pod creation would fail. So idle connections are kept for longer than
that (``KEEP_ALIVE_SECONDS``) and the client always closes first.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, Protocol

import orjson
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from webhook import __version__
from webhook.admission.review import (
    DEFAULT_MAX_BODY_BYTES,
    Injector,
    InvalidReview,
    allow_only,
    check_content_type,
    review,
    too_large,
)
from webhook.config import MeshConfig
from webhook.errors import ReviewError
from webhook.server.logs import LOGGER, log_invalid, log_review
from webhook.server.metrics import Metrics
from webhook.server.tlsreload import ReloadingTLS

__all__ = [
    "GRACEFUL_SHUTDOWN_SECONDS",
    "KEEP_ALIVE_SECONDS",
    "ServerThread",
    "Service",
    "create_app",
    "make_server",
    "reuse_port_socket",
]

KEEP_ALIVE_SECONDS = 120
GRACEFUL_SHUTDOWN_SECONDS = 20
_JSON = "application/json"


class Service(Protocol):
    """Something with a life cycle next to the server (the CA's caBundle/cert upkeep)."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...


def create_app(
    *,
    config: MeshConfig,
    bundle: str | Callable[[], str],
    injector: Injector | None = None,
    metrics: Metrics | None = None,
    tls: ReloadingTLS | None = None,
    routers: Sequence[APIRouter] = (),
    services: Sequence[Service] = (),
    noop_endpoint: bool = False,
) -> FastAPI:
    """The webhook app. ``injector`` defaults to the core with ``config`` and ``bundle`` bound.

    ``bundle`` is the trust bundle PEM, or a function that returns the current one (called
    once per review: :meth:`webhook.ca.trust.ReloadingTrust.bundle` follows ``ca.crt``).

    ``noop_endpoint`` adds ``POST /noop`` (parse the review, allow it): the ceiling of this
    stack, for the benchmark only.
    """
    if injector is None:
        from webhook.inject.pod import inject_pod

        if callable(bundle):
            current = bundle
            injector = lambda pod, namespace: inject_pod(  # noqa: E731
                pod, namespace=namespace, config=config, bundle=current()
            )
        else:
            core = functools.partial(inject_pod, config=config, bundle=bundle)
            injector = lambda pod, namespace: core(pod, namespace=namespace)  # noqa: E731
    bound_injector: Injector = injector
    metrics = metrics if metrics is not None else Metrics()
    limit = config.webhook.max_body_bytes or DEFAULT_MAX_BODY_BYTES

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        started: list[Service] = []
        try:
            for service in services:
                await service.start()
                started.append(service)
            yield
        finally:
            for service in reversed(started):
                await service.stop()

    app = _App(
        title="sidemesh",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.metrics = metrics
    app.state.tls = tls
    app.state.draining = False

    async def read_body(request: Request) -> bytes:
        check_content_type(request.headers.get("content-type"))
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large(int(declared), limit)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(size, limit)
            chunks.append(chunk)
        return b"".join(chunks)

    def refuse(exc: ReviewError, started: float) -> Response:
        reason = exc.reason if isinstance(exc, InvalidReview) else "invalid"
        uid = exc.uid if isinstance(exc, InvalidReview) else ""
        seconds = time.perf_counter() - started
        metrics.observe("invalid", reason, seconds)
        log_invalid(exc.status, reason, str(exc), uid, seconds)
        body: dict[str, Any] = {"error": reason, "message": str(exc)}
        if uid:
            body["uid"] = uid
        return Response(orjson.dumps(body), status_code=exc.status, media_type=_JSON)

    def answer_review(body: bytes, started: float) -> Response:
        try:
            outcome = review(body, injector=bound_injector, max_body_bytes=limit)
            payload = orjson.dumps(outcome.response)
        except ReviewError as exc:
            return refuse(exc, started)
        except Exception as exc:  # never a 500 with a traceback: log it, refuse the request
            LOGGER.exception("unexpected error answering a review")
            return refuse(InvalidReview(400, "unprocessable", f"cannot process: {exc}"), started)
        seconds = time.perf_counter() - started
        metrics.observe(outcome.result, outcome.reason, seconds)
        log_review(outcome, seconds)
        return Response(payload, media_type=_JSON)

    def answer_noop(body: bytes, started: float) -> Response:
        try:
            answer = allow_only(body, max_body_bytes=limit)
        except ReviewError as exc:
            return refuse(exc, started)
        return Response(orjson.dumps(answer), media_type=_JSON)

    def route(
        answer: Callable[[bytes, float], Response],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            try:
                body = await read_body(request)
            except ReviewError as exc:
                return refuse(exc, started)
            except ClientDisconnect:  # the client gave up mid-body: nobody is left to answer
                return Response(status_code=400)
            return answer(body, started)

        return endpoint

    app.add_api_route("/mutate", route(answer_review), methods=["POST"])
    app.fast["/mutate"] = _direct(answer_review, refuse, limit)
    if noop_endpoint:
        app.add_api_route("/noop", route(answer_noop), methods=["POST"])
        app.fast["/noop"] = _direct(answer_noop, refuse, limit)

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type=_JSON)

    @app.get("/readyz")
    async def readyz() -> Response:
        problems = []
        if getattr(app.state, "draining", False):
            problems.append("shutting down")
        if tls is None:
            problems.append("no serving certificate loaded")
        elif tls.not_after <= time.time():
            problems.append("the serving certificate has expired")
        body = {"ready": not problems, "problems": problems}
        if tls is not None:
            body["certificateNotAfter"] = int(tls.not_after)
        return Response(orjson.dumps(body), status_code=503 if problems else 200, media_type=_JSON)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        text, content_type = metrics.render()
        return Response(text, media_type=content_type)

    for router in routers:
        app.include_router(router)
    return app


# --- the direct path for POST /mutate --------------------------------------------------------

_Direct = Callable[[Scope, Receive, Send], Awaitable[None]]


class _App(FastAPI):
    """FastAPI, except that ``POST`` to a path in ``fast`` skips its request machinery.

    Starlette's middleware stack, router and Request object and FastAPI's dependency solving
    cost more server CPU per request than the review itself (docs/benchmarks.md has the
    figures). The direct handlers read the body and answer
    from the ASGI messages, through the same functions as the routes, so the answers are
    identical; other methods on those paths (``GET /mutate`` → 405) and every other path still
    go through FastAPI.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fast: dict[str, _Direct] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            direct = self.fast.get(scope["path"])
            if direct is not None:
                await direct(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _direct(
    answer: Callable[[bytes, float], Response],
    refuse: Callable[[ReviewError, float], Response],
    limit: int,
) -> _Direct:
    """An ASGI handler: the route's header and size checks, then ``answer(body, started)``."""

    async def handle(scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        content_type = declared = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"content-length":
                declared = value
        try:
            check_content_type(content_type)
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise too_large(int(declared), limit)
            chunks: list[bytes] = []
            size = 0
            more = True
            while more:
                message = await receive()
                if message["type"] != "http.request":  # the client gave up: nobody to answer
                    return
                chunk = message.get("body", b"")
                more = message.get("more_body", False)
                size += len(chunk)
                if size > limit:
                    raise too_large(size, limit)
                chunks.append(chunk)
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            response = answer(body, started)
        except ReviewError as exc:
            response = refuse(exc, started)
        start = {"type": "http.response.start", "status": response.status_code}
        await send({**start, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})

    return handle


# --- serving -------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn's server with two changes for Kubernetes.

    * SIGTERM first *drains* for ``shutdown_delay`` seconds: ``/readyz`` answers 503 and new
      connections are still served, because the API server keeps sending reviews to this pod
      until the endpoint removal has reached it; a refused connection there would fail a pod
      creation under ``failurePolicy: Fail``. Then the graceful stop: no new connections,
      requests in flight finish. SIGINT (Ctrl-C) and a second SIGTERM skip the delay.
    * No re-raising of the signal after the graceful stop: the exit code is 0.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI, shutdown_delay: float) -> None:
        super().__init__(config)
        self._app = app
        self._shutdown_delay = shutdown_delay

    def handle_exit(self, sig: int, frame: Any) -> None:
        import signal

        draining = getattr(self._app.state, "draining", False)
        if sig == signal.SIGTERM and self._shutdown_delay > 0 and not draining:
            self._app.state.draining = True
            LOGGER.info(
                "SIGTERM: draining before shutdown",
                extra={"event": "shutdown", "delay_seconds": self._shutdown_delay},
            )
            timer = threading.Timer(self._shutdown_delay, super().handle_exit, (sig, frame))
            timer.daemon = True
            timer.start()
            return
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        import signal

        previous = {
            sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def make_server(
    app: FastAPI, tls: ReloadingTLS, *, host: str, port: int, shutdown_delay: float = 0.0
) -> uvicorn.Server:
    """A uvicorn server for ``app`` with the hot-reloading TLS context."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        ssl_context_factory=tls.context_factory,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    return _Server(config, app, shutdown_delay)


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening socket with SO_REUSEPORT: one per worker, the kernel spreads connections.

    Workers sharing one accept queue (``uvicorn --workers``) get uneven shares of the load,
    depending on which process wins the wake-ups; with a queue per worker the kernel hashes
    connections evenly over the workers.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class ServerThread:
    """Run the app over real HTTPS on a background thread (tests, benchmarks).

    ``with ServerThread(app, tls) as srv:`` then ``srv.url``; the port is picked by the kernel.
    """

    def __init__(self, app: FastAPI, tls: ReloadingTLS, *, host: str = "127.0.0.1") -> None:
        self.sock = reuse_port_socket(host, 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"https://{host}:{self.port}"
        self.server = make_server(app, tls, host=host, port=self.port)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=GRACEFUL_SHUTDOWN_SECONDS + 5)
        self.sock.close()
