"""`sidemesh authz-check`: would this caller be let in? Answered from the RBAC configs the
server's sidecar gets (offline, compiled from a directory of manifests) or was sent (online,
from the control plane's debug endpoint).

Exit status: 0 allowed, 3 denied, 1 an error (an unknown pod, an unreachable control plane).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from webhook.errors import SidemeshError

__all__ = ["register"]

DENIED = 3


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "authz-check",
        help="would CALLER be allowed to call POD on PORT (access policy, as the sidecar decides)",
        description="Evaluate the access policy of the server pod's sidecar for one call: "
        "the deny filter, then the allow filter, exactly as compiled for the proxy. "
        "Exit status 0 allowed, 3 denied.",
    )
    p.add_argument(
        "--from",
        dest="caller",
        required=True,
        help="the caller's SPIFFE id (spiffe://…), or 'plaintext' for a caller without one",
    )
    p.add_argument("--to", required=True, help="the server pod, NAMESPACE/NAME")
    p.add_argument("--port", type=int, required=True, help="the pod's port")
    p.add_argument("--path", default=None, help="an HTTP request's path (absent: a TCP connection)")
    p.add_argument("--method", default="GET", help="the HTTP method (GET)")
    p.add_argument(
        "--header", action="append", default=[], help="NAME:VALUE of an HTTP header (repeatable)"
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--mesh-dir", type=Path, help="offline: a directory of manifests")
    where.add_argument("--url", help="online: the control plane's debug endpoint (…:15014)")
    p.add_argument("--config", default=None, help="mesh config file (its trust_domain)")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text")
    p.set_defaults(handler=_check)


def _filters_offline(directory: Path, pod_ref: str, config: str | None) -> Any:
    from webhook.config import load_config_file
    from webhook.discovery.build import build_model
    from webhook.discovery.filesource import FileSource
    from webhook.discovery.store import KINDS, ObjectStore
    from webhook.policy.state import AuthzState

    if not directory.is_dir():
        raise SidemeshError(f"--mesh-dir {directory}: not a directory")
    cfg = load_config_file(config)
    store = ObjectStore()
    FileSource(store, directory).load()
    model = build_model(
        {k: store.list(k) for k in KINDS},
        trust_domain=cfg.trust_domain,
        default_inbound_mtls=cfg.inbound_mtls,
    )
    ns, _, name = pod_ref.partition("/")
    pod = model.pods.get((ns, name))
    if pod is None:
        raise SidemeshError(f"no pod {pod_ref!r} in {directory} (want NAMESPACE/NAME)")
    state = AuthzState(cfg.trust_domain)
    state.update(store.list("AccessPolicy"))
    for why in state.errors.values():
        print(f"warning: not enforced: {why}")
    return {k: dict(v) for k, v in state.workload(pod).filters.items()}


def _filters_online(url: str, pod_ref: str) -> Any:
    import urllib.error  # with urllib.request: ssl, http; only when this command asks
    import urllib.parse
    import urllib.request

    query = urllib.parse.urlencode({"pod": pod_ref})
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/debug/config?{query}", timeout=10) as r:
            config = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise SidemeshError(f"{url}: {exc.code} {exc.read().decode(errors='replace')}") from None
    except (OSError, ValueError) as exc:
        raise SidemeshError(f"cannot read {url}/debug/config: {exc}") from None
    return {e["name"]: e["typed_config"] for e in config.get("extensions", [])}


def _check(args: argparse.Namespace) -> int:
    from webhook.policy.evaluate import Request, decide

    if args.caller != "plaintext" and args.caller.partition("://")[0] != "spiffe":
        raise SidemeshError(f"--from {args.caller!r}: a SPIFFE id, or 'plaintext'")
    headers = {}
    for raw in args.header:
        name, sep, value = raw.partition(":")
        if not sep or not name.strip():
            raise SidemeshError(f"--header {raw!r}: want NAME:VALUE")
        headers[name.strip().lower()] = value.strip()
    if args.mesh_dir is not None:
        filters = _filters_offline(args.mesh_dir, args.to, args.config)
    else:
        filters = _filters_online(args.url, args.to)
    req = Request(
        principal=None if args.caller == "plaintext" else args.caller,
        port=args.port,
        path=args.path,
        method=args.method.upper(),
        headers=headers,
    )
    decision = decide(filters, req)
    if args.output == "json":
        print(json.dumps({**decision.__dict__, "audited": list(decision.audited)}))
    else:
        verdict = "ALLOW" if decision.allowed else "DENY"
        print(f"{verdict}  {decision.reason}")
        for name in decision.audited:
            print(f"       audited by AUDIT policy {name} (counted and logged, not enforced)")
    return 0 if decision.allowed else DENIED
