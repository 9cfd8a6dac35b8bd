"""Helpers for the webhook tests: a development PKI, the real app over real HTTPS on
127.0.0.1, and a client that trusts exactly the mesh root — as the API server does with the
MutatingWebhookConfiguration's ``caBundle``.
"""

from __future__ import annotations

import contextlib
import copy
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from tests.support.server_thread import ServerThread
from webhook.admission.review import Injector
from webhook.ca.authority import CA_CERT, TLS_CERT, TLS_KEY
from webhook.ca.serving import ensure_dev_pki
from webhook.config import MeshConfig
from webhook.server.app import create_app
from webhook.server.metrics import Metrics
from webhook.server.tlsreload import ReloadingTLS

REPO = Path(__file__).resolve().parents[2]
SAMPLE_REVIEW = REPO / "webhook" / "samples" / "review.json"
V1 = "admission.k8s.io/v1"
V1BETA1 = "admission.k8s.io/v1beta1"
POD_KIND = {"group": "", "version": "v1", "kind": "Pod"}
POD_RESOURCE = {"group": "", "version": "v1", "resource": "pods"}


def make_pki(directory: Path) -> Path:
    """A development PKI, unless the directory already holds a serving pair and root cert
    (like a mounted Secret, which has no ``ca.key``); the same rule as ``sidemesh serve``."""
    directory.mkdir(parents=True, exist_ok=True)
    if not all((directory / name).exists() for name in (CA_CERT, TLS_CERT, TLS_KEY)):
        ensure_dev_pki(directory, now=datetime.now(UTC))
    return directory


def client_ssl(ca_file: Path) -> ssl.SSLContext:
    """Verify the server's chain against this root only, and its name (IP SAN 127.0.0.1)."""
    return ssl.create_default_context(cafile=str(ca_file))


def simple_pod(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "web-5f7b9c-", "labels": {"app": "web"}},
        "spec": {
            "containers": [
                {"name": "web", "image": "nginx:1.27", "ports": [{"containerPort": 80}]}
            ],
            **spec,
        },
    }


def admission_review(
    obj: Any,
    *,
    api_version: str = V1,
    uid: str = "7f0c2a9e-0000-4000-8000-000000000001",
    operation: str = "CREATE",
    namespace: str | None = "default",
    kind: dict[str, str] | None = None,
    resource: dict[str, str] | None = None,
    sub_resource: str | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    request: dict[str, Any] = {
        "uid": uid,
        "kind": kind or POD_KIND,
        "resource": resource or POD_RESOURCE,
        "operation": operation,
        "object": copy.deepcopy(obj),
        "oldObject": None,
        "dryRun": dry_run,
        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
    }
    if namespace is not None:
        request["namespace"] = namespace
    if sub_resource is not None:
        request["subResource"] = sub_resource
    return {"apiVersion": api_version, "kind": "AdmissionReview", "request": request}


@dataclass
class Running:
    url: str
    port: int
    cert_dir: Path
    metrics: Metrics
    tls: ReloadingTLS

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, verify=client_ssl(self.cert_dir / CA_CERT), timeout=10, **kwargs
        )


@contextlib.contextmanager
def https_webhook(
    cert_dir: Path,
    *,
    config: MeshConfig | None = None,
    injector: Injector | None = None,
    check_interval: float = 0.0,
) -> Iterator[Running]:
    """The real app (real core unless ``injector`` is given) on a free port over HTTPS."""
    make_pki(cert_dir)
    config = config or MeshConfig()
    metrics = Metrics()
    tls = ReloadingTLS(
        cert_dir / TLS_CERT,
        cert_dir / TLS_KEY,
        check_interval=check_interval,
        on_load=lambda not_after, reloaded: metrics.cert_loaded(not_after, reloaded=reloaded),
        on_error=metrics.cert_reload_failed,
    )
    app = create_app(
        config=config,
        bundle=(cert_dir / CA_CERT).read_text(),
        injector=injector,
        metrics=metrics,
        tls=tls,
    )
    with ServerThread(app, tls, limits=config.limits) as srv:
        yield Running(srv.url, srv.port, cert_dir, metrics, tls)
