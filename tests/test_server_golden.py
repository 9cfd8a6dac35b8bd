"""Both front doors, one golden set: every pod template of every golden case goes through
``POST /mutate`` over HTTPS, and what comes back must be exactly what the CLI's golden files
say — the same JSON patch, and applied to the pod, the same pod as in ``sidemesh inject``'s
output. Error cases must be refused with the core's message.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonpatch
import pytest

from tests.support.golden_cases import Case, PodCase, cases, normalise, pod_cases
from tests.support.server_thread import ServerThread
from tests.support.webhook_https import Running, admission_review, client_ssl, https_webhook
from webhook.config import MeshConfig
from webhook.manifests import iter_documents
from webhook.server.app import create_app

pytestmark = pytest.mark.golden

POD_CASES = pod_cases()
CASES = {c.name: c for c in cases()}


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One HTTPS webhook per distinct mesh config of the golden cases, started on demand."""
    with contextlib.ExitStack() as stack:
        cert_dir = tmp_path_factory.mktemp("pki")
        # the PKI and the TLS context come from the helper; each config gets its own app
        base: Running = stack.enter_context(https_webhook(cert_dir))
        started: dict[tuple[MeshConfig, str], httpx.Client] = {}

        def client_for(config: MeshConfig, bundle: str) -> httpx.Client:
            key = (config, bundle)
            if key not in started:
                app = create_app(config=config, bundle=bundle, tls=base.tls)
                srv = stack.enter_context(ServerThread(app, base.tls))
                started[key] = stack.enter_context(_client(srv.url, cert_dir))
            return started[key]

        yield client_for


def _client(url: str, cert_dir: Path) -> httpx.Client:
    return httpx.Client(base_url=url, verify=client_ssl(cert_dir / "ca.crt"), timeout=10)


def _injected_template(case: Case, document: int, pointer: str) -> dict[str, Any]:
    """The pod template at ``pointer`` in the CLI's golden output for input ``document``."""
    indices = [d.index for d in iter_documents(case.text) if d.data is not None]
    expected = case.expected_documents()
    assert expected is not None
    out_docs = [d.data for d in iter_documents(expected) if d.data is not None]
    obj = out_docs[indices.index(document)]
    for part in pointer.strip("/").split("/") if pointer.strip("/") else []:
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    template: dict[str, Any] = obj
    return template


def _ids(pc: PodCase) -> str:
    return f"{pc.case}:{pc.document}{pc.template or '/'}"


def test_every_golden_case_is_sent() -> None:
    assert len(POD_CASES) >= 10
    assert any(pc.error for pc in POD_CASES) and any(pc.patch for pc in POD_CASES)


@pytest.mark.parametrize("pc", POD_CASES, ids=_ids)
def test_mutate_matches_the_golden_files(servers: Any, pc: PodCase) -> None:
    client = servers(pc.config, pc.bundle)
    review = admission_review(pc.pod, namespace=pc.namespace, uid=f"golden-{_ids(pc)}")
    r = client.post("/mutate", json=review)
    assert r.status_code == 200
    resp = r.json()["response"]
    assert resp["uid"] == review["request"]["uid"]
    if pc.error is not None:
        assert resp["allowed"] is False
        assert resp["status"]["code"] == 400
        assert resp["status"]["message"] == pc.error
        return
    assert resp["allowed"] is True
    assert resp["auditAnnotations"]["reason"] == pc.reason
    if not pc.patch:
        assert "patch" not in resp and "patchType" not in resp
        return
    assert resp["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(resp["patch"]))
    assert normalise(ops, pc.bundle) == pc.patch
    patched = jsonpatch.apply_patch(pc.pod, ops)
    golden = _injected_template(CASES[pc.case], pc.document, pc.template)
    want = {"apiVersion": "v1", "kind": "Pod", **golden}
    assert normalise(patched, pc.bundle) == want
