"""A small local HTTPS stand-in for the kube-apiserver — not a real one.

No API server exists on this machine, so the code that talks to one (TokenReview, caBundle
patching) is tested against this stand-in, which answers the few calls sidemesh makes the way
the real API server does (paths, verbs, content types, ``Status`` error bodies):

* ``POST /apis/authentication.k8s.io/v1/tokenreviews`` — verifies the token as a real
  API server would: signature against the issuer's key, expiry, and audience against the
  requested audiences (``status.audiences`` is the intersection);
* ``GET``/``PATCH /apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/<name>``
  — with JSON patch (``test`` ops included) and merge patch; ``resourceVersion`` increments;
* ``GET``/``PUT``/``PATCH /api/v1/namespaces/<ns>/secrets/<name>`` — optimistic concurrency
  like the API server: a PUT (or a merge patch) whose ``metadata.resourceVersion`` is not the
  current one is a 409 Conflict; every accepted write increments ``resourceVersion``;
* ``GET /openid/v1/jwks`` — the issuer's public keys;
* ``GET /api/v1/namespaces/<ns>/pods/<name>`` — the pods in ``pods`` (the CNI plugin's lookup);
* list and watch of Namespaces, Services, Pods and EndpointSlices (``objects``, see
  :mod:`tests.support.standin_watch`): resourceVersions, watch events, bookmarks, 410 Gone.

Callers must present ``Authorization: Bearer <caller_token>``; like RBAC for sidemesh, only
the webhook configuration named in ``allowed_names`` may be read or patched, and only the
Secrets in ``allowed_secrets`` (namespace, name) may be touched (403 otherwise).
It listens on 127.0.0.1 (a random free port) with a certificate from a throw-away CA and
records every request in ``requests`` for assertions.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import re
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonpatch
import jwt

from tests.support.jwks_issuer import Issuer
from tests.support.standin_watch import (
    Gone,
    ObjectLog,
    match_list_path,
    match_status_path,
    parse_query,
)
from webhook.ca.authority import CertificateAuthority
from webhook.kube.client import KubeClient

__all__ = ["APIServerStandin", "Recorded"]

MWC_PATH = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/"
SECRETS_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)/secrets/([^/]+)$")
TOKENREVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
POD_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)$")


@dataclass
class Recorded:
    method: str
    path: str
    content_type: str
    body: Any


@dataclass
class APIServerStandin:
    """Start with :meth:`start` (or as a context manager); ``url`` and ``ca_file`` then work."""

    directory: Path
    issuer: Issuer
    caller_token: str = "standin-caller-token"
    #: (namespace, name) → Pod, answered to ``GET …/pods/<name>``; tests add them.
    pods: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    #: Runs the listening socket's creation: e.g. a lab namespace's ``in_namespace``, so that
    #: the stand-in is reached at 127.0.0.1 from inside that namespace (a node's own API
    #: server address), and not from the machine's.
    bind: Callable[[Callable[[], Any]], Any] | None = None
    allowed_names: tuple[str, ...] = ("sidemesh-injector",)
    webhook_configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    fail_next_patches: int = 0  # answer this many PATCHes with 409 Conflict (races)
    #: (namespace, name) of the Secrets the caller may get, update and patch (sidemesh's Role).
    allowed_secrets: tuple[tuple[str, str], ...] = (("sidemesh-system", "sidemesh-tls"),)
    secrets: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    #: The first N Secret GETs wait for each other (up to 20 s), so N concurrent writers all
    #: read the same resourceVersion and the race between their writes really happens.
    secret_get_rendezvous: int = 0
    #: The list/watch kinds; tests add, modify and delete through it.
    objects: ObjectLog = field(default_factory=ObjectLog)
    #: Answer this many list/watch requests with 500 (a flapping API server).
    fail_next_lists: int = 0

    def start(self) -> APIServerStandin:
        ca = CertificateAuthority.create(now=datetime.now(UTC), common_name="standin ca")
        cert_pem, key_pem = ca.issue_serving(["localhost"], ["127.0.0.1"], now=datetime.now(UTC))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca_file = self.directory / "standin-ca.crt"
        self.ca_file.write_text(ca.root_pem)
        (self.directory / "standin.crt").write_text(cert_pem)
        (self.directory / "standin.key").write_text(key_pem)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.directory / "standin.crt", self.directory / "standin.key")
        standin = self
        self.lock = threading.Lock()  # one writer at a time, like etcd's compare-and-swap
        self._rendezvous = (
            threading.Barrier(self.secret_get_rendezvous) if self.secret_get_rendezvous else None
        )
        self._secret_gets = 0

        class Handler(_Handler):
            owner = standin

        def listen() -> ThreadingHTTPServer:
            return ThreadingHTTPServer(("127.0.0.1", 0), Handler)

        self._server = self.bind(listen) if self.bind is not None else listen()
        self._server.daemon_threads = True
        self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.objects.close()  # open watches end, so their handler threads do too
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> APIServerStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self, token: str | None = None) -> KubeClient:
        """sidemesh's client for this stand-in, as ``caller_token`` (or ``token``)."""
        return KubeClient.at(self.url, token=token or self.caller_token, ca_file=str(self.ca_file))

    def kubeconfig(self, path: Path, *, context: str = "standin") -> Path:
        """A kubeconfig file for this stand-in, its one context named ``context``."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "standin",
                    "cluster": {"server": self.url, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": "sidemesh", "user": {"token": self.caller_token}}],
            "contexts": [{"name": context, "context": {"cluster": "standin", "user": "sidemesh"}}],
            "current-context": context,
        }
        path.write_text(json.dumps(config))
        return path

    def add_webhook_config(self, name: str, hooks: int = 1) -> dict[str, Any]:
        """A MutatingWebhookConfiguration as `kubectl apply` would leave it (no caBundle)."""
        obj = {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": name, "resourceVersion": "1", "uid": "u-" + name},
            "webhooks": [
                {
                    "name": f"hook{i}.sidemesh.io",
                    "admissionReviewVersions": ["v1"],
                    "sideEffects": "None",
                    "clientConfig": {
                        "service": {
                            "name": "sidemesh",
                            "namespace": "sidemesh-system",
                            "path": "/mutate",
                        }
                    },
                }
                for i in range(hooks)
            ],
        }
        self.webhook_configs[name] = obj
        return obj

    def add_secret(
        self, name: str, data: dict[str, bytes], *, namespace: str = "sidemesh-system"
    ) -> dict[str, Any]:
        """A Secret as ``sidemesh install`` leaves it (type ``kubernetes.io/tls``)."""
        obj = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "resourceVersion": "1",
                "uid": "u-" + name,
            },
            "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
        }
        self.secrets[(namespace, name)] = obj
        return obj

    def secret_data(self, name: str, *, namespace: str = "sidemesh-system") -> dict[str, bytes]:
        obj = self.secrets[(namespace, name)]
        return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}

    def wait_at_rendezvous(self) -> None:
        if self._rendezvous is None:
            return
        with self.lock:
            self._secret_gets += 1
            waits = self._secret_gets <= self._rendezvous.parties
        if waits:
            with contextlib.suppress(threading.BrokenBarrierError):
                self._rendezvous.wait(timeout=20)

    # --- what the API server decides ---------------------------------------------------

    def review(self, token: str, audiences: list[str]) -> dict[str, Any]:
        """TokenReview status for ``token``, like the API server's service-account authenticator."""
        key = self.issuer.private_key.public_key()
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[self.issuer.algorithm],
                options={"verify_aud": False},
                issuer=self.issuer.issuer_url,
            )
        except jwt.PyJWTError as exc:
            return {"authenticated": False, "error": f"invalid bearer token: {exc}"}
        token_aud = claims.get("aud") or []
        token_aud = [token_aud] if isinstance(token_aud, str) else token_aud
        wanted = audiences or ["https://kubernetes.default.svc.cluster.local"]
        common = [a for a in wanted if a in token_aud]
        if not common:
            return {
                "authenticated": False,
                "error": f"token audiences {token_aud} is invalid for the target audiences "
                f"{wanted}",
            }
        k8s = claims.get("kubernetes.io") or {}
        pod = (k8s.get("pod") or {}).get("name")
        user: dict[str, Any] = {
            "username": claims.get("sub", ""),
            "uid": (k8s.get("serviceaccount") or {}).get("uid", ""),
            "groups": ["system:serviceaccounts", "system:authenticated"],
        }
        if pod:
            user["extra"] = {"authentication.kubernetes.io/pod-name": [pod]}
        return {"authenticated": True, "user": user, "audiences": common}


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class _Handler(BaseHTTPRequestHandler):
    owner: APIServerStandin
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the test asserts on `requests` instead

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw) if raw else None

    def _authorized(self) -> bool:
        if self.headers.get("Authorization") != f"Bearer {self.owner.caller_token}":
            self._send(401, _status(401, "Unauthorized", "Unauthorized"))
            return False
        return True

    def _record(self, body: Any) -> None:
        self.owner.requests.append(
            Recorded(self.command, self.path, self.headers.get("Content-Type", ""), body)
        )

    def do_GET(self) -> None:
        self._record(None)
        if self.path == "/openid/v1/jwks":
            self._send(200, self.owner.issuer.jwks())
            return
        if not self._authorized():
            return
        listed = match_list_path(self.path.split("?")[0])
        if listed is not None:
            self._list_or_watch(*listed)
            return
        if SECRETS_PATH.match(self.path.split("?")[0]):
            key = self._secret_key("get")
            if key is not None:
                self.owner.wait_at_rendezvous()
                with self.owner.lock:
                    self._send(200, self.owner.secrets[key])
            return
        pod = POD_PATH.match(self.path.split("?")[0])
        if pod is not None:
            found = self.owner.pods.get((pod.group(1), pod.group(2)))
            if found is None:
                self._send(404, _status(404, "NotFound", f'pods "{pod.group(2)}" not found'))
            else:
                self._send(200, found)
            return
        name = self._mwc_name()
        if name is not None:
            self._send(200, self.owner.webhook_configs[name])

    def _list_or_watch(self, res: Any, namespace: str | None) -> None:
        query = parse_query(self.path)
        with self.owner.lock:
            failing = self.owner.fail_next_lists > 0
            self.owner.fail_next_lists -= failing
        if failing:
            self._send(500, _status(500, "InternalError", "etcdserver: request timed out"))
            return
        if query.get("watch") not in ("1", "true"):
            try:
                limit = int(query.get("limit") or 0)
                self._send(
                    200, self.owner.objects.list(res, namespace, limit, query.get("continue", ""))
                )
            except Gone as exc:
                self._send(410, _status(410, "Expired", str(exc)))
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def send(line: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.wfile.flush()

        try:
            if self.owner.objects.watch(res, namespace, query, send):
                self.wfile.write(b"0\r\n\r\n")  # a clean end: the client just watches again
        except OSError:
            pass  # the client went away
        self.close_connection = True

    def do_PUT(self) -> None:
        body = self._body()
        self._record(body)
        if not self._authorized():
            return
        key = self._secret_key("update")
        if key is None:
            return
        meta = (body or {}).get("metadata") or {}
        if meta.get("name") != key[1] or meta.get("namespace", key[0]) != key[0]:
            msg = "the name of the object does not match the name on the URL"
            self._send(400, _status(400, "BadRequest", msg))
            return
        with self.owner.lock:
            self._write_secret(key, body, meta.get("resourceVersion"))

    def do_POST(self) -> None:
        body = self._body()
        self._record(body)
        if not self._authorized():
            return
        if self.path.split("?")[0] != TOKENREVIEW_PATH:
            self._send(404, _status(404, "NotFound", "the server could not find the resource"))
            return
        spec = (body or {}).get("spec") or {}
        status = self.owner.review(spec.get("token", ""), spec.get("audiences") or [])
        self._send(
            201,
            {
                "kind": "TokenReview",
                "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"creationTimestamp": None},
                # The API server answers with the object as posted plus its status (the
                # official client's model requires ``spec.token`` in the answer).
                "spec": spec,
                "status": status,
            },
        )

    def do_PATCH(self) -> None:
        body = self._body()
        self._record(body)
        if not self._authorized():
            return
        if SECRETS_PATH.match(self.path.split("?")[0]):
            self._patch_secret(body)
            return
        status_of = match_status_path(self.path.split("?")[0])
        if status_of is not None:
            self._patch_status(status_of, body)
            return
        name = self._mwc_name()
        if name is None:
            return
        if self.owner.fail_next_patches > 0:
            self.owner.fail_next_patches -= 1
            self.owner.webhook_configs[name]["metadata"]["resourceVersion"] = str(
                int(self.owner.webhook_configs[name]["metadata"]["resourceVersion"]) + 1
            )
            self._send(409, _status(409, "Conflict", "the object has been modified"))
            return
        current = self.owner.webhook_configs[name]
        ctype = self.headers.get("Content-Type", "")
        try:
            if ctype == "application/json-patch+json":
                patched = jsonpatch.apply_patch(current, body)
            elif ctype == "application/merge-patch+json":
                patched = _merge(copy.deepcopy(current), body)
            else:
                self._send(415, _status(415, "UnsupportedMediaType", f"unsupported {ctype}"))
                return
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
            self._send(422, _status(422, "Invalid", f"the patch does not apply: {exc}"))
            return
        rv = int(current["metadata"]["resourceVersion"]) + 1
        patched["metadata"]["resourceVersion"] = str(rv)
        self.owner.webhook_configs[name] = patched
        self._send(200, patched)

    def _patch_status(self, target: Any, body: Any) -> None:
        res, namespace, name = target
        if self.headers.get("Content-Type", "") != "application/merge-patch+json":
            ctype = self.headers.get("Content-Type", "")
            self._send(415, _status(415, "UnsupportedMediaType", f"unsupported {ctype}"))
            return
        try:
            self._send(200, self.owner.objects.patch_status(res.kind, namespace, name, body))
        except KeyError:
            self._send(404, _status(404, "NotFound", f'{res.plural} "{name}" not found'))

    def _patch_secret(self, body: Any) -> None:
        key = self._secret_key("patch")
        if key is None:
            return
        ctype = self.headers.get("Content-Type", "")
        with self.owner.lock:
            current = self.owner.secrets[key]
            try:
                if ctype == "application/json-patch+json":
                    patched = jsonpatch.apply_patch(current, body)
                    precondition = None  # a JSON patch guards itself with `test` ops
                elif ctype == "application/merge-patch+json":
                    patched = _merge(copy.deepcopy(current), body)
                    precondition = ((body or {}).get("metadata") or {}).get("resourceVersion")
                else:
                    self._send(415, _status(415, "UnsupportedMediaType", f"unsupported {ctype}"))
                    return
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                self._send(422, _status(422, "Invalid", f"the patch does not apply: {exc}"))
                return
            self._write_secret(key, patched, precondition)

    def _write_secret(self, key: tuple[str, str], obj: Any, precondition: str | None) -> None:
        """Store ``obj`` if ``precondition`` (a resourceVersion) is unset or current; 409 if not.
        The caller holds ``owner.lock``, so check and write are one step."""
        current = self.owner.secrets[key]
        rv = current["metadata"]["resourceVersion"]
        if precondition is not None and precondition != rv:
            msg = (
                f'Operation cannot be fulfilled on secrets "{key[1]}": the object has been '
                "modified; please apply your changes to the latest version and try again"
            )
            self._send(409, _status(409, "Conflict", msg))
            return
        stored = copy.deepcopy(obj)
        stored.setdefault("metadata", {}).update(
            {"name": key[1], "namespace": key[0], "resourceVersion": str(int(rv) + 1)}
        )
        stored["metadata"]["uid"] = current["metadata"]["uid"]
        self.owner.secrets[key] = stored
        self._send(200, stored)

    def _secret_key(self, verb: str) -> tuple[str, str] | None:
        match = SECRETS_PATH.match(self.path.split("?")[0])
        if match is None:
            self._send(404, _status(404, "NotFound", "the server could not find the resource"))
            return None
        key = (match.group(1), match.group(2))
        if key not in self.owner.allowed_secrets:
            msg = (
                f'secrets "{key[1]}" is forbidden: User "system:serviceaccount:sidemesh-system:'
                f'sidemesh" cannot {verb} resource "secrets" in API group "" in the namespace '
                f'"{key[0]}"'
            )
            self._send(403, _status(403, "Forbidden", msg))
            return None
        if key not in self.owner.secrets:
            self._send(404, _status(404, "NotFound", f'secrets "{key[1]}" not found'))
            return None
        return key

    def _mwc_name(self) -> str | None:
        path = self.path.split("?")[0]
        if not path.startswith(MWC_PATH):
            self._send(404, _status(404, "NotFound", "the server could not find the resource"))
            return None
        name = path[len(MWC_PATH) :]
        if name not in self.owner.allowed_names:
            msg = f'mutatingwebhookconfigurations "{name}" is forbidden for this service account'
            self._send(403, _status(403, "Forbidden", msg))
            return None
        if name not in self.owner.webhook_configs:
            self._send(404, _status(404, "NotFound", f'"{name}" not found'))
            return None
        return name


def _merge(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return patch
    if not isinstance(target, dict):
        target = {}
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        else:
            target[k] = _merge(target.get(k), v)
    return target
