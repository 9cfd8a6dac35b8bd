"""`sidemesh top`: success rate, request rate and latency per workload, from the sidecars."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "top",
        help="golden signals per workload (success rate, RPS, p50/p95/p99) from the sidecars",
        description="Scrape each sidecar's Prometheus endpoint (:15090/stats/prometheus) and "
        "show, per workload, what its sidecars answered: success rate (non-5xx), requests per "
        "second and latency percentiles, like `linkerd viz stat`. Sidecars are given as "
        "ADDRESS[:PORT] or taken from the control plane's connected proxies (--discovery).",
    )
    p.add_argument("addresses", nargs="*", metavar="ADDRESS[:PORT]", help="sidecars to scrape")
    p.add_argument(
        "--discovery",
        metavar="URL",
        default=None,
        help="the control plane's debug URL (e.g. http://127.0.0.1:15014): scrape every "
        "connected sidecar",
    )
    p.add_argument("--port", type=int, default=15090, help="stats port (default 15090)")
    p.add_argument(
        "--window",
        type=float,
        default=5.0,
        help="seconds between two scrapes; 0: since each sidecar started (default 5)",
    )
    p.add_argument("--json", action="store_true", help="rows as JSON")
    p.set_defaults(handler=_top)


def _top(args: argparse.Namespace) -> int:
    import urllib.request  # here: `sidemesh --help` must stay light

    from webhook.errors import SidemeshError
    from webhook.telemetry import promtext, top

    targets = [_with_port(a, args.port) for a in args.addresses]
    if args.discovery:
        url = f"{args.discovery.rstrip('/')}/debug/proxies"
        with urllib.request.urlopen(url, timeout=5) as resp:
            proxies = json.loads(resp.read())["proxies"]
        targets += [_with_port(_peer_ip(p["peer"]), args.port) for p in proxies]
    if not targets:
        raise SidemeshError("name at least one sidecar ADDRESS or give --discovery URL")

    def scrape() -> list[list[promtext.Sample]]:
        out = []
        for target in targets:
            try:
                with urllib.request.urlopen(f"http://{target}/stats/prometheus", timeout=5) as r:
                    out.append(list(promtext.parse(r.read().decode())))
            except OSError as exc:
                raise SidemeshError(f"cannot scrape {target}: {exc}") from None
        return out

    if args.window > 0:
        before = scrape()
        time.sleep(args.window)
        table = top.rows(scrape(), before, args.window)
    else:
        table = top.rows(scrape())
    if args.json:
        print(json.dumps([row.__dict__ for row in table], indent=1))
    else:
        print(top.render(table))
    return 0


def _with_port(address: str, port: int) -> str:
    if address.startswith("[") and "]:" in address:
        return address
    if address.count(":") == 1:
        return address
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _peer_ip(peer: str) -> str:
    """grpc's peer string (``ipv4:10.0.0.3:41234``, ``ipv6:[fd00::3]:41234``) → the IP."""
    kind, _, rest = peer.partition(":")
    host = rest.rsplit(":", 1)[0]
    return host.strip("[]") if kind == "ipv6" else host
