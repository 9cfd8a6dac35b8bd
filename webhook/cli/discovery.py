"""`sidemesh discovery` (the control plane), `sidemesh proxy-status`, `sidemesh proxy-config`."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
from pathlib import Path
from typing import Any

__all__ = ["register"]

DEFAULT_DEBUG = "http://127.0.0.1:15014"


def register(subparsers: Any) -> None:
    _register_discovery(subparsers)
    _register_proxy_views(subparsers)


def _register_discovery(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "discovery",
        help="the control plane: learn the mesh, program every sidecar over delta xDS (mTLS)",
        description="Read Namespaces, Services, EndpointSlices and Pods (from --mesh-dir, or "
        "the embedded demo mesh) and serve delta ADS over mTLS to the sidecars.",
    )
    p.add_argument("--listen", default="0.0.0.0:15012", help="xDS address (default :15012)")
    p.add_argument("--debug-host", default="127.0.0.1", help="debug/metrics HTTP host")
    p.add_argument("--debug-port", type=int, default=15014, help="debug/metrics port (15014)")
    p.add_argument("--cert-dir", default="certs", help="ca.crt (+ ca.key, or xds.crt/xds.key)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--mesh-dir", default=None, help="directory of manifests, watched")
    source.add_argument(
        "--kubernetes",
        action="store_true",
        help="list+watch the cluster through the API server (in a pod: its service account; "
        "else --kubeconfig or kubectl's default)",
    )
    p.add_argument("--kubeconfig", default=None, help="with --kubernetes: kubeconfig file")
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between checks")
    p.add_argument("--config", default=None, help="mesh config file (YAML); default: built-ins")
    p.add_argument(
        "--scoped",
        action="store_true",
        help="each sidecar sees its namespace, its sidemesh.io/dependencies and what it "
        "was seen calling, instead of every Service",
    )
    p.add_argument(
        "--ratelimit-address",
        default="",
        help="HOST:PORT of the rate-limit service (sidemesh ratelimit) the sidecars ask about "
        "Global limits; default: none (Global limits are reported, not enforced)",
    )
    p.add_argument(
        "--ratelimit-identity",
        default="",
        help="the SPIFFE id sidecars require of the rate-limit service (default: "
        "spiffe://<trust domain>/ns/sidemesh-system/sa/sidemesh-ratelimit)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(handler=_discovery)


def _register_proxy_views(subparsers: Any) -> None:
    """The two commands that read the control plane's debug endpoint."""
    st = subparsers.add_parser(
        "proxy-status", help="every connected sidecar: identity, ACKed vs sent, last NACK"
    )
    st.add_argument("--url", default=DEFAULT_DEBUG, help=f"debug endpoint ({DEFAULT_DEBUG})")
    st.add_argument("-o", "--output", choices=["table", "json"], default="table")
    st.set_defaults(handler=_status)

    pc = subparsers.add_parser(
        "proxy-config",
        help="listeners, routes, clusters, endpoints and filter configs one sidecar was sent",
    )
    pc.add_argument("pod", help="NAMESPACE/NAME")
    pc.add_argument("--url", default=DEFAULT_DEBUG, help=f"debug endpoint ({DEFAULT_DEBUG})")
    kinds = ["clusters", "endpoints", "listeners", "routes", "extensions"]
    pc.add_argument("--type", choices=kinds, default=None)
    pc.add_argument(
        "--routes",
        action="store_const",
        const="routes",
        dest="type",
        help="only the routes, each with the rule (and TrafficPolicy) it came from",
    )
    pc.add_argument("-o", "--output", choices=["table", "json"], default="table")
    pc.set_defaults(handler=_config)


def _discovery(args: argparse.Namespace) -> int:
    import asyncio

    from webhook.config import load_config_file
    from webhook.discovery.core import DiscoverySettings
    from webhook.discovery.run import RunSettings, new_event_loop, run_discovery
    from webhook.server.logs import configure_logging

    configure_logging(args.log_level)
    cfg = load_config_file(args.config)
    settings = RunSettings(
        listen=args.listen,
        debug_host=args.debug_host,
        debug_port=args.debug_port,
        cert_dir=Path(args.cert_dir),
        mesh_dir=Path(args.mesh_dir) if args.mesh_dir else None,
        poll_interval=args.poll_interval,
        kubernetes=args.kubernetes,
        kubeconfig=args.kubeconfig,
        discovery=DiscoverySettings(
            trust_domain=cfg.trust_domain,
            default_inbound_mtls=cfg.inbound_mtls,
            plaintext_ports=cfg.plaintext_ports,
            ports=cfg.ports,
            scoped=args.scoped,
            telemetry=cfg.telemetry,
            ratelimit_address=args.ratelimit_address,
            ratelimit_identity=args.ratelimit_identity,
        ),
    )
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(run_discovery(settings))
    return 0


def _get(url: str) -> Any:
    import urllib.error  # with urllib.request: ssl, http, email; only when a command asks
    import urllib.request

    from webhook.errors import SidemeshError

    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("error", "")
        except ValueError:
            detail = ""
        raise SidemeshError(f"{url}: HTTP {exc.code} {detail}".rstrip()) from None
    except (urllib.error.URLError, OSError) as exc:
        raise SidemeshError(
            f"cannot reach the control plane's debug endpoint {url}: {exc} "
            "(is `sidemesh discovery` running? --url, or kubectl port-forward)"
        ) from None


def _status(args: argparse.Namespace) -> int:
    data = _get(f"{args.url.rstrip('/')}/debug/proxies")
    if args.output == "json":
        print(json.dumps(data, indent=1))
        return 0
    rows: list[tuple[str, ...]] = [
        ("POD", "IDENTITY", "CDS", "EDS", "LDS", "RDS", "SYNCED", "NACKS", "LAST NACK")
    ]
    for p in data["proxies"]:
        t = p["types"]

        def cell(kind: str, t: dict[str, Any] = t) -> str:
            x = t.get(kind)
            if x is None:
                return "-"
            return f"{x['resources']}{'' if not x['unacked'] else ' (unacked)'}"

        nacks = sum(x["nacks"] for x in t.values())
        last = next((x["last_nack"]["error"] for x in t.values() if x["last_nack"]), "")
        rows.append(
            (
                p["pod"],
                p["identity"],
                cell("clusters"),
                cell("endpoints"),
                cell("listeners"),
                cell("routes"),
                "yes" if p["synced"] else "no",
                str(nacks),
                last[:60],
            )
        )
    _table(rows)
    return 0


def _config(args: argparse.Namespace) -> int:
    pod = urllib.parse.quote(args.pod, safe="/")
    data = _get(f"{args.url.rstrip('/')}/debug/config?pod={pod}")
    if args.type:
        data = {args.type: data.get(args.type, [])}
    if args.output == "json":
        print(json.dumps(data, indent=1))
        return 0
    for kind, items in data.items():
        print(f"{kind.upper()} ({len(items)})")
        for item in items:
            print(f"  {_summary(kind, item)}")
    return 0


def _route_lines(config: dict[str, Any]) -> str:
    """A RouteConfiguration: one line per route, match → action, then the rule it came from."""
    count = sum(len(vh.get("routes", [])) for vh in config.get("virtual_hosts", []))
    lines = [f"{config.get('name', '')}  {count} routes"]
    for vhost in config.get("virtual_hosts", []):
        for route in vhost.get("routes", []):
            match = route.get("match", {})
            what = [
                f"{k} {match[k]}" for k in ("path", "prefix", "path_separated_prefix") if k in match
            ]
            if "safe_regex" in match:
                what.append(f"regex {match['safe_regex'].get('regex')}")
            what += [f"header {h.get('name')}" for h in match.get("headers", [])]
            what += [f"query {q.get('name')}" for q in match.get("query_parameters", [])]
            action = route.get("route", {})
            if "weighted_clusters" in action:
                to = ", ".join(
                    f"{c.get('weight')}× {c.get('name')}"
                    for c in action["weighted_clusters"].get("clusters", [])
                )
            elif "cluster" in action:
                to = action["cluster"]
            else:
                to = f"direct {route.get('direct_response', {}).get('status', '?')}"
            extras = [k for k in ("timeout", "retry_policy", "hash_policy") if k in action]
            if "typed_per_filter_config" in route:
                extras.append("fault")
            meta = route.get("metadata", {}).get("filter_metadata", {}).get("sidemesh.io/rule", {})
            origin = meta.get("rule", route.get("name", ""))
            if meta.get("policy"):
                origin += f" + {meta['policy']}"
            more = f" [{', '.join(extras)}]" if extras else ""
            lines.append(f"    {' and '.join(what) or 'any'} -> {to}{more}  ({origin})")
    return "\n".join(lines)


_TLS_MATCH = "envoy.transport_socket_match"
_MUTUAL_TLS = "mutual_tls"


def _extension_lines(ext: dict[str, Any]) -> str:
    """An ECDS filter config: the policies of an RBAC filter, each value a set_filter_state
    filter (the TCP access gate) sets with the expression it is computed by."""
    typed = ext.get("typed_config", {})
    kind = str(typed.get("@type", "")).rsplit("/", 1)[-1]
    head = f"{ext.get('name', '')}  {kind}"
    if ".set_filter_state." in kind:
        values = typed.get("on_downstream_tls_handshake", [])
        when = "at the caller's TLS handshake" if values else "nothing"
        lines = [f"{head}: {len(values)} values set {when}"]
        lines += [
            f"    {v.get('object_key')} = "
            f"{v.get('format_string', {}).get('text_format_source', {}).get('inline_string')}"
            for v in values
        ]
        return "\n".join(lines)
    names = [
        f"{key}: {', '.join(typed[key].get('policies', {})) or '(none)'}"
        for key in ("rules", "shadow_rules")
        if key in typed
    ]
    if "rate_limits" in typed:
        names.append(f"{len(typed['rate_limits'])} limits")
    return f"{head}  {'; '.join(names)}" if names else head


def _is_mtls(endpoint: dict[str, Any]) -> bool:
    labels = endpoint.get("metadata", {}).get("filter_metadata", {}).get(_TLS_MATCH, {})
    return bool(labels.get("tlsMode") == _MUTUAL_TLS)


def _summary(kind: str, item: dict[str, Any]) -> str:
    if kind == "routes":
        return _route_lines(item)
    if kind == "extensions":
        return _extension_lines(item)
    if kind == "clusters":
        tls = len(item.get("transport_socket_matches", []))
        mtls = f", mTLS identities: {tls}" if tls else ""
        return f"{item['name']}  {item.get('type', 'EDS')}{mtls}"
    if kind == "endpoints":
        eps = [
            f"{e['endpoint']['address']['socket_address']['address']}:"
            f"{e['endpoint']['address']['socket_address'].get('port_value')}"
            f"{' mTLS' if _is_mtls(e) else ''}"
            for group in item.get("endpoints", [])
            for e in group.get("lb_endpoints", [])
        ]
        return f"{item['cluster_name']}  {', '.join(eps) or '(none)'}"
    chains = item.get("filter_chains", [])
    return f"{item['name']}  {len(chains)} filter chains"


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        line = "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
        sys.stdout.write(line.rstrip() + "\n")
