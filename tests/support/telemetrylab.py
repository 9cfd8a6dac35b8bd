"""A meshed lab for telemetry: shared by its end-to-end test and its benchmark.

    node 10.200.0.1 ── cp      sidemesh serve (webhook + CA), sidemesh discovery, an OTLP
                     │         trace receiver (:4317)
                     ├─ client meshed (Deployment "client")
                     ├─ web    meshed (Deployment "web"), HTTP on 8080, logs every request
                     └─ db     meshed, STRICT, a server-first protocol on 3306 (mysql)

Services ``web`` (10.96.0.10:80) and ``db`` (10.96.0.13:3306, ``appProtocol: mysql``) exist only
in the control plane's objects (no kube-proxy): they work through the client's sidecar.
"""

from __future__ import annotations

import copy
import json
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.meshlab import (
    APP_UID,
    MESHAPP,
    PYTHON,
    SIDEMESH,
    admit,
    start_control_plane,
    start_discovery,
    write_manifest,
)
from tests.support.netns import NetnsLab, Pod
from tests.support.podrunner import PodRunner
from webhook.telemetry import promtext
from webhook.telemetry.promtext import Sample

__all__ = ["DB", "OTLP_PORT", "PODS", "WEB", "Lab", "start"]

WEB, DB = "10.96.0.10", "10.96.0.13"
OTLP_PORT = 4317
RECEIVER = Path(__file__).resolve().parent / "otlp_receiver.py"

#: pod name → (service account, ports, annotations, pod-template-hash)
PODS = {
    "client-6d4cf56db6-x7k2p": ("client", [8080], {}, "6d4cf56db6"),
    "web-7c9f8d6b5-q4zlm": ("web", [8080], {"telemetry.sidemesh.io/access-log": "100%"},
                            "7c9f8d6b5"),
    # STRICT: a PERMISSIVE pod serves a declared server-first port in plaintext.
    "db-0": ("db", [3306], {"sidemesh.io/inbound-mtls": "STRICT"}, ""),
}  # fmt: skip


def _manifest(name: str, pod_annotations: bool) -> dict[str, Any]:
    sa, ports, annotations, template_hash = PODS[name]
    if not pod_annotations:
        annotations = {k: v for k, v in annotations.items() if "telemetry" not in k}
    labels = {"app": sa}
    if template_hash:
        labels["pod-template-hash"] = template_hash
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "demo", "labels": labels,
                     "annotations": annotations},
        "spec": {
            "serviceAccountName": sa,
            "securityContext": {"runAsUser": APP_UID, "runAsGroup": APP_UID},
            "containers": [{
                "name": "app",
                "image": "example.com/app:1",
                "ports": [{"containerPort": p, "protocol": "TCP"} for p in ports],
            }],
        },
    }  # fmt: skip


def _service(name: str, ip: str, port: int, target: int, proto: str | None) -> Any:
    spec_port: dict[str, Any] = {"name": "main", "port": port, "targetPort": target}
    if proto:
        spec_port["appProtocol"] = proto
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [spec_port]},
    }


def _slice(service: str, port: int, pod: str, ip: str) -> Any:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": f"{service}-1", "namespace": "demo",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "main", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True},
                       "targetRef": {"kind": "Pod", "namespace": "demo", "name": pod}}],
    }  # fmt: skip


class Lab:
    def __init__(self, lab: NetnsLab) -> None:
        self.lab = lab
        self.node = lab.node()
        self.cp = self.node.add_pod("cp")
        # The client needs a default route: ClusterIPs exist only in its sidecar's config.
        self.pods: dict[str, Pod] = {
            n: self.node.add_pod(n.split("-")[0], default_route=n.startswith("client"))
            for n in PODS
        }
        self.mesh_dir = lab.tmpdir("mesh")
        self.runners: dict[str, PodRunner] = {}
        self.spans = self.mesh_dir / "spans.jsonl"
        # Set by start(): the control plane's mesh config (rewritten to restart discovery with
        # other telemetry settings) and PKI.
        self.config = Path()
        self.pki = Path()
        self.discovery: Any = None

    def traces(self) -> dict[str, list[dict[str, Any]]]:
        """The spans the test collector received, by trace id."""
        out: dict[str, list[dict[str, Any]]] = {}
        text = self.spans.read_text() if self.spans.exists() else ""
        for line in text.splitlines():
            span = json.loads(line)
            out.setdefault(span["trace_id"], []).append(span)
        return out

    def pod(self, workload: str) -> Pod:
        return next(p for n, p in self.pods.items() if n.startswith(workload))

    def runner(self, workload: str) -> PodRunner:
        return next(r for n, r in self.runners.items() if n.startswith(workload))

    def write_config(self, telemetry: dict[str, Any]) -> None:
        self.config.write_text(json.dumps({
            "ca_address": f"https://{self.cp.ip}:8443",
            "discovery_address": f"{self.cp.ip}:15012",
            "mesh_cidrs": [str(self.node.subnet)],
            "telemetry": telemetry,
        }))  # fmt: skip

    def start_discovery(self) -> None:
        self.discovery = start_discovery(
            self.cp, self.pki, self.mesh_dir, "--config", str(self.config)
        )

    def restart_discovery(self, telemetry: dict[str, Any]) -> None:
        """The control plane again with another telemetry config; returns once every sidecar
        reconnected and acknowledged what it was sent."""
        self.discovery.stop()
        self.write_config(telemetry)
        self.start_discovery()
        deadline = time.monotonic() + 60
        while not self._all_synced():
            assert time.monotonic() < deadline, "the sidecars never synced with the new config"
            time.sleep(0.2)

    def _all_synced(self) -> bool:
        def call() -> Any:
            with urllib.request.urlopen("http://127.0.0.1:15014/debug/proxies", timeout=5) as r:
                return json.loads(r.read())

        try:
            proxies = self.cp.ns.in_namespace(call)["proxies"]
        except OSError:
            return False
        return len(proxies) == len(PODS) and all(p["synced"] for p in proxies)

    def write(self, name: str, obj: Any) -> None:
        write_manifest(self.mesh_dir, name, obj)

    def scrape(self, workload: str) -> list[Sample]:
        """The pod's metrics, from the node, as Prometheus scrapes them."""
        url = f"http://{self.pod(workload).ip}:15090/stats/prometheus"

        def call() -> str:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return str(resp.read().decode())

        return list(promtext.parse(self.node.ns.in_namespace(call)))


def start(
    lab: NetnsLab,
    telemetry: dict[str, Any] | None = None,
    *,
    pod_annotations: bool = True,
    envoy_binary: dict[str, str] | None = None,
) -> Lab:
    """The lab with every pod running; ``telemetry``: the mesh config's section (default:
    tracing to the lab's collector, every trace sampled); ``pod_annotations`` False: neither
    the namespace nor a pod overrides the mesh's access-log setting (otherwise the namespace
    logs failures only and web every request); ``envoy_binary``: workload → the program its
    agent starts as Envoy (e.g. Envoy under valgrind)."""
    m = Lab(lab)
    if telemetry is None:
        telemetry = {"tracing_collector": f"{m.cp.ip}:{OTLP_PORT}", "tracing_sampling": 100}
    m.spans = lab.tmpdir("otlp") / "spans.jsonl"
    m.cp.ns.spawn([sys.executable, str(RECEIVER), str(OTLP_PORT), str(m.spans)]).expect("listening")
    plane = start_control_plane(
        lab,
        m.node,
        m.cp,
        discovery_address=f"{m.cp.ip}:15012",
        extra_config={"telemetry": telemetry},
    )
    m.pki, m.config = plane.pki, plane.config
    pki, issuer, cp_url = plane.pki, plane.issuer, plane.url
    admitted = {}
    for name in PODS:
        pod = admit(m.node.ns, cp_url, pki / "ca.crt", _manifest(name, pod_annotations))
        admitted[name] = pod
        if envoy_binary and name.split("-")[0] in envoy_binary:
            proxy = next(c for c in pod["spec"]["initContainers"] if c["name"] == "sidemesh-proxy")
            proxy["args"] = [
                *proxy.get("args", []),
                "--envoy-binary",
                envoy_binary[name.split("-")[0]],
            ]
        record = copy.deepcopy(pod)
        ip = m.pods[name].ip
        record["status"] = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
        m.write(f"pod-{name}", record)
    # The namespace logs failures only; web's own annotation (every request) wins over it.
    ns_meta: dict[str, Any] = {"name": "demo"}
    if pod_annotations:
        ns_meta["annotations"] = {"telemetry.sidemesh.io/access-log": "errors"}
    m.write("ns", {"apiVersion": "v1", "kind": "Namespace", "metadata": ns_meta})
    for svc, ip, port, target, proto in (("web", WEB, 80, 8080, None),
                                         ("db", DB, 3306, 3306, "mysql")):  # fmt: skip
        pod_name = next(n for n in PODS if n.startswith(svc))
        m.write(f"svc-{svc}", _service(svc, ip, port, target, proto))
        m.write(f"slice-{svc}", _slice(svc, target, pod_name, m.pods[pod_name].ip))
    m.start_discovery()
    for name, (_sa, ports, _ann, _hash) in PODS.items():
        command = "serve-banner" if name.startswith("db") else "serve"
        runner = PodRunner(
            lab=lab, node=m.node, pod_net=m.pods[name], pod=admitted[name],
            app_commands={"app": [PYTHON, MESHAPP, command, *map(str, ports)]},
            sidemesh=SIDEMESH, token_for=issuer.token,
        )  # fmt: skip
        runner.start()
        runner.procs["app"].expect("listening")
        m.runners[name] = runner
    return m
