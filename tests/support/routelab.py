"""The traffic-rules lab: real Envoys programmed over ADS by ``sidemesh discovery``, in network
namespaces, with the Services and rules of :data:`RULES` in the directory it watches.

    node 10.x.0.1 ── cp      sidemesh serve (webhook + CA), sidemesh discovery (:15012)
                  ├─ client  meshed; runs the load generator (``routeapp load``)
                  ├─ web-1   meshed, version v1, HTTP :8080 + gRPC :9090
                  ├─ web-2   meshed, version v1, HTTP :8080
                  ├─ web-3   meshed, version v2, HTTP :8080 + gRPC :9090
                  └─ bad     meshed, every request answers 503 (FAIL=1)

No kube-proxy: a ClusterIP exists only in the client's sidecar, so every request below went
through the client's outbound HTTP connection manager and its routes.
"""

from __future__ import annotations

import copy
import json
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.meshlab import (
    APP_UID,
    SIDEMESH,
    admit,
    debug_json,
    start_control_plane,
    start_discovery,
    write_manifest,
)
from tests.support.netns import NetnsLab, Node, Pod
from tests.support.podrunner import PodRunner
from tests.support.programs import PROGRAMS

__all__ = ["IPS", "RouteLab", "start_route_lab"]

ROUTEAPP = str(PROGRAMS / "routeapp.py")
#: The venv's interpreter (the gRPC modes need grpcio).
VENV_PY = sys.executable
PODS = {
    # name: (version label, serves gRPC too, extra env)
    "web-1": ("v1", True, {}),
    "web-2": ("v1", False, {}),
    "web-3": ("v2", True, {}),
    "bad": ("v1", False, {"FAIL": "1"}),
}
#: Service → (ClusterIP, pods behind it, port, target port, appProtocol).
SERVICES: dict[str, tuple[str, list[str], int, int, str | None]] = {
    "split": ("10.96.0.10", ["web-1", "web-2", "web-3"], 80, 8080, None),
    "canary": ("10.96.0.11", ["web-1", "web-2"], 80, 8080, None),
    "canary-v2": ("10.96.0.12", ["web-3"], 80, 8080, None),
    "flaky": ("10.96.0.13", ["web-1"], 80, 8080, None),
    "noretry": ("10.96.0.14", ["web-1"], 80, 8080, None),
    "slow": ("10.96.0.15", ["web-2"], 80, 8080, None),
    "slow-plain": ("10.96.0.16", ["web-2"], 80, 8080, None),
    "delayed": ("10.96.0.17", ["web-2"], 80, 8080, None),
    "aborted": ("10.96.0.18", ["web-2"], 80, 8080, None),
    "breaker": ("10.96.0.19", ["web-2"], 80, 8080, None),
    "pool": ("10.96.0.20", ["web-1", "web-2", "bad"], 80, 8080, None),
    "sticky": ("10.96.0.21", ["web-1", "web-2", "web-3"], 80, 8080, None),
    "grpc": ("10.96.0.22", ["web-1", "web-3"], 9090, 9090, "grpc"),
    "grpc-a": ("10.96.0.23", ["web-1"], 9090, 9090, "grpc"),
    "grpc-b": ("10.96.0.24", ["web-3"], 9090, 9090, "grpc"),
    "mirrored": ("10.96.0.25", ["web-2"], 80, 8080, None),
    "teller": ("10.96.0.26", ["web-1"], 80, 8080, None),
    "ledger": ("10.96.0.27", ["web-3"], 80, 8080, None),
}
#: Services of another namespace than ``demo`` (routes reach them by a ReferenceGrant).
NAMESPACE = {"ledger": "bank"}
IPS = {name: ip for name, (ip, *_rest) in SERVICES.items()}


def _svc_ref(name: str, port: int = 80, weight: int | None = None) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": name, "port": port}
    if weight is not None:
        ref["weight"] = weight
    return ref


def _route(name: str, rules: list[dict[str, Any]], kind: str = "HTTPRoute") -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": "demo"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": name}], "rules": rules},
    }


def _policy(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "sidemesh.io/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": {"targetRef": {"kind": "Service", "name": name}, **spec},
    }


def _subset(service: str, subset: str, weight: int) -> dict[str, Any]:
    return {
        "group": "sidemesh.io",
        "kind": "ServiceSubset",
        "name": f"{service}.{subset}",
        "port": 80,
        "weight": weight,
    }


_V1_V2 = [
    {"name": "v1", "labels": {"version": "v1"}},
    {"name": "v2", "labels": {"version": "v2"}},
]
_TIGHT = {"maxConnections": 1, "maxPendingRequests": 1, "maxRequests": 1}
_EJECT = {
    "consecutive5xx": 3,
    "interval": "1s",
    "baseEjectionTime": "60s",
    "maxEjectionPercent": 50,
}
_MOVED = {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}, "statusCode": 301}
_REWRITE = {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2"}}
_STICKY = {"policy": "ConsistentHash", "consistentHash": {"header": "x-user"}}

#: The rules under test, as a user would write them (file name → object).
RULES: dict[str, dict[str, Any]] = {
    "route-split": _route(
        "split", [{"backendRefs": [_subset("split", "v1", 90), _subset("split", "v2", 10)]}]
    ),
    "policy-split": _policy("split", subsets=_V1_V2),
    "route-canary": _route(
        "canary",
        [
            {
                "matches": [{"headers": [{"name": "x-canary", "value": "yes"}]}],
                "backendRefs": [_svc_ref("canary-v2")],
            },
            {"backendRefs": [_svc_ref("canary")]},
        ],
    ),
    "policy-flaky": _policy("flaky", retries={"attempts": 3, "retryOn": ["5xx"]}),
    "route-slow": _route(
        "slow",
        [
            {
                "matches": [{"path": {"type": "PathPrefix", "value": "/slow"}}],
                "timeouts": {"request": "300ms"},
                "backendRefs": [_svc_ref("slow")],
            },
            {
                "matches": [{"path": {"type": "PathPrefix", "value": "/slow-odd"}}],
                "timeouts": {"request": "3s", "backendRequest": "200ms"},
                "backendRefs": [_svc_ref("slow")],
            },
        ],
    ),
    "policy-slow": _policy("slow", retries={"attempts": 2, "retryOn": ["5xx", "reset"]}),
    "policy-delayed": _policy("delayed", fault={"delay": {"fixedDelay": "100ms", "percent": 100}}),
    "policy-aborted": _policy("aborted", fault={"abort": {"httpStatus": 503, "percent": 25}}),
    "policy-breaker": _policy("breaker", connectionPool=_TIGHT),
    "policy-pool": _policy("pool", outlierDetection=_EJECT),
    "policy-sticky": _policy("sticky", loadBalancer=_STICKY),
    "route-mirrored": _route(
        "mirrored",
        [
            {
                "backendRefs": [_svc_ref("mirrored")],
                "filters": [
                    {
                        "type": "RequestMirror",
                        "requestMirror": {"backendRef": _svc_ref("canary-v2")},
                    },
                    {
                        "type": "RequestHeaderModifier",
                        "requestHeaderModifier": {
                            "set": [{"name": "x-tenant", "value": "blue"}],
                            "remove": ["x-debug"],
                        },
                    },
                    {
                        "type": "ResponseHeaderModifier",
                        "responseHeaderModifier": {
                            "add": [{"name": "x-served-by", "value": "mesh"}]
                        },
                    },
                ],
            },
            {
                "matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
                "filters": [{"type": "RequestRedirect", "requestRedirect": _MOVED}],
            },
            {
                "matches": [{"path": {"type": "PathPrefix", "value": "/legacy"}}],
                "filters": [{"type": "URLRewrite", "urlRewrite": _REWRITE}],
                "backendRefs": [_svc_ref("mirrored")],
            },
        ],
    ),
    "route-teller": _route(
        "teller", [{"backendRefs": [{"name": "ledger", "namespace": "bank", "port": 80}]}]
    ),
    "grant-bank": {
        "apiVersion": "gateway.networking.k8s.io/v1beta1",
        "kind": "ReferenceGrant",
        "metadata": {"name": "demo-may-call-ledger", "namespace": "bank"},
        "spec": {
            "from": [
                {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "demo"}
            ],
            "to": [{"group": "", "kind": "Service", "name": "ledger"}],
        },
    },
    "route-grpc": _route(
        "grpc",
        [{"backendRefs": [_svc_ref("grpc-a", 9090, 80), _svc_ref("grpc-b", 9090, 20)]}],
        kind="GRPCRoute",
    ),
}


def _pod(name: str, version: str, grpc: bool, env: dict[str, str]) -> dict[str, Any]:
    def container(cname: str, port: int) -> dict[str, Any]:
        return {
            "name": cname,
            "image": "example.com/app:1",
            "ports": [{"containerPort": port, "protocol": "TCP"}],
            "env": [
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                *({"name": k, "value": v} for k, v in env.items()),
            ],
        }

    containers = [container("app", 8080)] + ([container("grpc", 9090)] if grpc else [])
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "demo",
            "labels": {"app": "web", "version": version},
            "annotations": {},
        },
        "spec": {
            "serviceAccountName": name.split("-")[0],
            "securityContext": {"runAsUser": APP_UID, "runAsGroup": APP_UID},
            "containers": containers,
        },
    }


def _service(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    ip, _, port, target, proto = SERVICES[name]
    spec_port: dict[str, Any] = {
        "name": "grpc" if proto else "http",
        "port": port,
        "targetPort": target,
        "protocol": "TCP",
    }
    if proto:
        spec_port["appProtocol"] = proto
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NAMESPACE.get(name, "demo")},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [spec_port]},
    }
    return svc, spec_port


@dataclass
class RouteLab:
    lab: NetnsLab
    node: Node
    cp: Pod
    pods: dict[str, Pod]
    mesh_dir: Path
    runners: dict[str, PodRunner] = field(default_factory=dict)

    def write(self, name: str, obj: Any) -> None:
        write_manifest(self.mesh_dir, name, obj)

    def debug(self, path: str) -> Any:
        return debug_json(self.cp, path)

    def client(self, *args: str, timeout: float = 180) -> dict[str, Any]:
        """Run ``routeapp`` in the client pod (as the app's uid: its traffic is captured)."""
        done = self.pods["client"].ns.run(
            [VENV_PY, ROUTEAPP, *args], uid=APP_UID, gid=APP_UID, timeout=timeout
        )
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    def load(self, service: str, n: int, *options: str) -> dict[str, Any]:
        return self.client("load", IPS[service], str(SERVICES[service][2]), str(n), *options)

    def stats(self, pod: str, prefix: str) -> dict[str, int]:
        def call() -> str:
            with urllib.request.urlopen("http://127.0.0.1:15000/stats", timeout=3) as resp:
                return str(resp.read().decode())

        text: str = self.pods[pod].ns.in_namespace(call)
        out = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if name.startswith(prefix) and value.isdigit():
                out[name[len(prefix) :]] = int(value)
        return out

    def synced(self, pod: str) -> bool:
        status = self.debug("/debug/proxies")
        found = [p for p in status["proxies"] if p["pod"] == f"demo/{pod}"]
        return bool(found) and bool(found[0]["synced"])


def _slice(name: str, lab: RouteLab) -> dict[str, Any]:
    _, backends, _, target, _ = SERVICES[name]
    _, spec_port = _service(name)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{name}-1",
            "namespace": NAMESPACE.get(name, "demo"),
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv4",
        "ports": [{"name": spec_port["name"], "port": target, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [lab.pods[p].ip],
                "conditions": {"ready": True},
                "targetRef": {"kind": "Pod", "namespace": "demo", "name": p},
            }
            for p in backends
        ],
    }


def start_route_lab(lab: NetnsLab) -> RouteLab:
    node = lab.node()
    cp = node.add_pod("cp")
    pods = {"client": node.add_pod("client", default_route=True)}
    for name in PODS:
        pods[name] = node.add_pod(name)
    m = RouteLab(lab, node, cp, pods, lab.tmpdir("mesh"))
    plane = start_control_plane(lab, node, cp, discovery_address=f"{cp.ip}:15012")
    pki, issuer, cp_url = plane.pki, plane.issuer, plane.url

    manifests = {"client": _pod("client", "v1", False, {})}
    manifests["client"]["metadata"]["labels"] = {"app": "client"}
    for name, (version, grpc, extra) in PODS.items():
        manifests[name] = _pod(name, version, grpc, extra)
    admitted = {}
    for name, manifest in manifests.items():
        pod = admit(node.ns, cp_url, pki / "ca.crt", manifest)
        admitted[name] = pod
        record = copy.deepcopy(pod)
        ip = pods[name].ip
        record["status"] = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
        m.write(f"pod-{name}", record)
    for ns in ("demo", "bank"):
        m.write(f"ns-{ns}", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    for name in SERVICES:
        m.write(f"svc-{name}", _service(name)[0])
        m.write(f"slice-{name}", _slice(name, m))
    for name, obj in RULES.items():
        m.write(name, obj)
    start_discovery(cp, pki, m.mesh_dir)
    for name in ("web-1", "web-2", "web-3", "bad", "client"):
        grpc = PODS.get(name, ("", False, {}))[1]
        commands = {"app": [VENV_PY, ROUTEAPP, "serve", "8080"]}
        if grpc:
            commands["grpc"] = [VENV_PY, ROUTEAPP, "serve-grpc", "9090"]
        runner = PodRunner(
            lab=lab,
            node=node,
            pod_net=pods[name],
            pod=admitted[name],
            app_commands=commands,
            sidemesh=SIDEMESH,
            token_for=issuer.token,
        )
        runner.start()
        for proc in runner.procs.values():
            if proc is runner.procs.get("app") or proc is runner.procs.get("grpc"):
                proc.expect("listening")
        m.runners[name] = runner
    return m
