"""The HTTPS edge: a FastAPI app around :func:`webhook.admission.review.review`, served by uvicorn.

Endpoints:

| method | path               | what                                                         |
|--------|--------------------|--------------------------------------------------------------|
| POST   | ``/mutate``        | AdmissionReview v1/v1beta1 → AdmissionReview (same version)  |
| GET    | ``/healthz``       | the process is alive                                         |
| GET    | ``/readyz``        | config loaded and a serving certificate in date (else 503)   |
| GET    | ``/metrics``       | Prometheus text (also on ``--metrics-port`` as plain HTTP)   |
| POST   | ``/v1/certificates``| the mini-CA, when its router is passed in (``ca.key`` present)|

``/mutate`` is answered by :class:`webhook.admission.endpoint.MutateEndpoint`, a small ASGI
middleware in front of the whole FastAPI stack: it reads the raw body, parses it with orjson
and runs the core inline on the event loop (a review is pure CPU, cheaper than a thread hop).

What a client may hold of the server (header sizes, times, connections) is bounded per
connection by :mod:`webhook.server.limits`, from the mesh config's ``limits`` section.

Keep-alive: the API server keeps idle webhook connections for 90 s. If the server closed them
sooner, the API server could send a review on a connection the server is just closing, and a
POST is not retried — the pod creation would fail. So idle connections are kept for longer than
that (``limits.idle_timeout_seconds``) and the client always closes first.
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

from webhook import __version__
from webhook.admission.endpoint import MutateEndpoint
from webhook.admission.review import Injector
from webhook.config import ClientLimits, MeshConfig
from webhook.server.limits import guarded_protocol
from webhook.server.logs import LOGGER
from webhook.server.metrics import Metrics
from webhook.server.tlsreload import ReloadingTLS

__all__ = [
    "GRACEFUL_SHUTDOWN_SECONDS",
    "Service",
    "create_app",
    "make_server",
    "reuse_port_socket",
]

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
) -> FastAPI:
    """The webhook app. ``injector`` defaults to the core with ``config`` and ``bundle`` bound.

    ``bundle`` is the trust bundle PEM, or a function that returns the current one (called
    once per review: :meth:`webhook.ca.trust.ReloadingTrust.bundle` follows ``ca.crt``).
    """
    bound_injector = injector if injector is not None else _core_injector(config, bundle)
    metrics = metrics if metrics is not None else Metrics()
    app = FastAPI(
        title="sidemesh",
        version=__version__,
        lifespan=_lifespan(services),
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        # FastAPI's own OpenTelemetry hooks ask the global providers on every request; the
        # webhook's metrics and logs are its own, so they are off.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.metrics = metrics
    app.state.tls = tls
    app.state.draining = False
    app.add_exception_handler(Exception, _unexpected_handler(metrics))
    _add_status_routes(app, metrics, tls)
    for router in routers:
        app.include_router(router)
    # /mutate goes first, ahead of even Starlette's error middleware (it catches its own): the
    # stack is built here once, as Starlette would on the first request, with it outermost.
    app.middleware_stack = MutateEndpoint(
        app.build_middleware_stack(),
        injector=bound_injector,
        max_body_bytes=config.webhook.max_body_bytes,
        metrics=metrics,
    )
    return app


def _core_injector(config: MeshConfig, bundle: str | Callable[[], str]) -> Injector:
    """The injection core with the config and the (current) trust bundle bound."""
    from webhook.inject.pod import inject_pod

    if callable(bundle):
        current = bundle
        return lambda pod, namespace: inject_pod(
            pod, namespace=namespace, config=config, bundle=current()
        )
    core = functools.partial(inject_pod, config=config, bundle=bundle)
    return lambda pod, namespace: core(pod, namespace=namespace)


def _lifespan(
    services: Sequence[Service],
) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    """Start the services in order with the app; stop the started ones in reverse."""

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

    return lifespan


def _unexpected_handler(metrics: Metrics) -> Callable[[Request, Exception], Awaitable[Response]]:
    async def unexpected(_request: Request, _exc: Exception) -> Response:
        # A bug in a route: Starlette re-raises it to uvicorn, which logs the traceback;
        # counted here and answered without the exception's text.
        metrics.unexpected.labels("app").inc()
        body = b'{"error":"internal","message":"sidemesh could not answer; see its log"}'
        # uvicorn closes the connection after an app exception: say so, so that no client
        # sends its next request on it.
        headers = {"connection": "close"}
        return Response(body, status_code=500, media_type=_JSON, headers=headers)

    return unexpected


def _add_status_routes(app: FastAPI, metrics: Metrics, tls: ReloadingTLS | None) -> None:
    """``/healthz``, ``/readyz`` and ``/metrics``."""

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
    app: FastAPI,
    tls: ReloadingTLS,
    *,
    host: str,
    port: int,
    shutdown_delay: float = 0.0,
    limits: ClientLimits | None = None,
    metrics: Metrics | None = None,
) -> uvicorn.Server:
    """A uvicorn server for ``app`` with the hot-reloading TLS context and the client limits.

    ``metrics`` defaults to the app's own (``app.state.metrics``).
    """
    limits = limits if limits is not None else ClientLimits()
    metrics = metrics if metrics is not None else app.state.metrics
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        ssl_context_factory=tls.context_factory,
        loop="uvloop",
        http=guarded_protocol(limits, metrics),
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_keep_alive=int(limits.idle_timeout_seconds),
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
