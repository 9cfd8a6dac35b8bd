"""Who a sidecar's telemetry names: itself from its environment (so every sidecar of a shape
gets the same listeners), a pod-IP destination from the listener's pod directory, and the
access-log policy from the pod, its namespace or the mesh."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

from tests.support.telemetry_compile import (
    compiled_listeners as _listeners,
    demo_model as _demo,
    stat_tags as _tags,
    telemetry_loggers as _loggers,
)
from tests.support.xds import delta_request, drain
from webhook.discovery.build import build_model
from webhook.discovery.compiler import LISTENER, proxy_options, proxy_resources
from webhook.discovery.core import Discovery, DiscoverySettings
from webhook.discovery.filesource import FileSource
from webhook.discovery.model import MeshModel
from webhook.discovery.store import KINDS, ObjectStore
from webhook.telemetry.instrument import POD_DIRECTORY
from webhook.telemetry.settings import AccessLogPolicy, ProxyFacts
from webhook.telemetry.workload import LABEL_ENV, labels_from_env, proxy_environment


def test_the_sidecar_names_itself_from_the_labels_the_injector_hands_it() -> None:
    env = {LABEL_ENV["pod-template-hash"]: "7c9f8d6b5", LABEL_ENV["app"]: "x", "OTHER": "1"}
    labels = labels_from_env(env)
    assert labels == {"pod-template-hash": "7c9f8d6b5", "app": "x"}
    got = proxy_environment("web-7c9f8d6b5-q4zlm", "demo", "spiffe://td/ns/demo/sa/web", labels)
    assert got == {
        "SIDEMESH_WORKLOAD": "web",
        "SIDEMESH_NAMESPACE": "demo",
        "SIDEMESH_PRINCIPAL": "spiffe://td/ns/demo/sa/web",
        "OTEL_RESOURCE_ATTRIBUTES": "service.name=web.demo",
    }


def test_namespace_annotation_sets_its_pods_default_and_the_pod_one_wins() -> None:
    def policy(pod: dict[str, str], namespace: dict[str, str]) -> AccessLogPolicy:
        return ProxyFacts.of(
            workload="w", namespace="n", principal="p", annotations=pod,
            default_access_log="1%", namespace_annotations=namespace,
        ).access_log  # fmt: skip

    key = "telemetry.sidemesh.io/access-log"
    assert policy({}, {key: "errors"}) == AccessLogPolicy(True, 0.0)
    assert policy({key: "100%"}, {key: "off"}) == AccessLogPolicy(True, 100.0)
    # A namespace value that does not parse: the mesh default.
    assert policy({}, {key: "chatty"}) == AccessLogPolicy(True, 1.0)


def _with_namespace(annotations: dict[str, str]) -> MeshModel:
    store = ObjectStore()
    FileSource(store, None).load()
    objects = {k: store.list(k) for k in KINDS}
    ns = {"kind": "Namespace", "metadata": {"name": "demo", "annotations": annotations}}
    objects["Namespace"] = [
        *[n for n in objects["Namespace"] if n["metadata"]["name"] != "demo"],
        ns,
    ]
    return build_model(objects)


def test_compiled_listeners_follow_the_namespace_access_log_setting() -> None:
    key = "telemetry.sidemesh.io/access-log"

    def json_logs(model: MeshModel, pod_name: str) -> list[Any]:
        pod = model.pods[("demo", pod_name)]
        opts = proxy_options(pod, trust_domain="cluster.local", plaintext_ports=(53,))
        listeners = proxy_resources(model, opts, pod, model.services.values()).listeners
        chain = next(
            c for c in listeners["inbound"]["filter_chains"] if c["name"] == "inbound-mtls-http"
        )
        return _loggers(chain)[1:]

    assert json_logs(_with_namespace({key: "off"}), "frontend-1") == []
    [errors] = json_logs(_with_namespace({key: "errors"}), "frontend-1")
    assert "runtime_filter" not in json.dumps(errors["filter"])  # failures only, no sampling
    # A pod's own annotation wins over its namespace's.
    model = _with_namespace({key: "off"})
    pod = model.pods[("demo", "frontend-1")]
    own = dataclasses.replace(pod, telemetry={key: "100%"})
    model = dataclasses.replace(model, pods={**model.pods, ("demo", "frontend-1"): own})
    [every] = json_logs(model, "frontend-1")
    assert "filter" not in every


def test_listeners_do_not_name_the_workload_so_one_build_serves_every_sidecar() -> None:
    # Two workloads with other names and service accounts: the same listeners, byte for byte.
    assert json.dumps(_listeners("frontend-1")) == json.dumps(_listeners("backend-1"))
    listeners = _listeners("frontend-1")
    # Other pods are named (a call to a pod IP is labelled with its workload), itself never.
    listeners["outbound"]["metadata"]["filter_metadata"].pop(POD_DIRECTORY)
    assert '"frontend' not in json.dumps(listeners) and "sa/frontend" not in json.dumps(listeners)
    text = json.dumps(_listeners("frontend-1"))
    # ... while a pod that asks for another access-log policy gets its own.
    model = _demo()
    pod = model.pods[("demo", "frontend-1")]
    pod = dataclasses.replace(pod, telemetry={"telemetry.sidemesh.io/access-log": "off"})
    opts = proxy_options(pod, trust_domain="cluster.local", plaintext_ports=(53,))
    off = proxy_resources(model, opts, pod, model.services.values()).listeners
    assert json.dumps(off) != text


def test_a_call_to_a_pod_ip_is_labelled_with_the_pods_workload() -> None:
    out = _listeners("frontend-1")["outbound"]
    directory = out["metadata"]["filter_metadata"][POD_DIRECTORY]
    model = _demo()
    backend = model.pods[("demo", "backend-1")]
    assert directory[backend.ips[0]] == {"workload": "backend", "namespace": "demo"}
    chain = next(c for c in out["filter_chains"] if c["name"] == "outbound-mesh-http-8080")
    tags = _tags(_loggers(chain)[0])
    assert tags["destination_workload"] == "%FILTER_STATE(sidemesh.dest.workload:PLAIN)%"
    states = chain["filters"][0]["typed_config"]["on_new_connection"]
    lookup = {
        x["object_key"]: x["format_string"]["text_format_source"]["inline_string"] for x in states
    }
    assert POD_DIRECTORY in lookup["sidemesh.dest.workload"]


def test_the_control_plane_sends_two_workloads_the_same_listener_bytes() -> None:
    async def listeners_of(pod: str, sa: str) -> dict[str, bytes]:
        store = ObjectStore()
        FileSource(store, None).load()
        d = Discovery(store, DiscoverySettings())
        d.start(asyncio.get_running_loop())
        conn = d.connect(f"spiffe://cluster.local/ns/demo/sa/{sa}", "demo", pod, "t", "n")
        d.on_request(conn, delta_request(LISTENER))
        return {r.name: r.resource.value for m in drain(conn) for r in m.resources}

    async def both() -> tuple[dict[str, bytes], dict[str, bytes]]:
        return await listeners_of("frontend-1", "frontend"), await listeners_of(
            "backend-1", "backend"
        )

    frontend, backend = asyncio.run(both())
    assert set(frontend) == {"inbound", "outbound"}
    assert frontend == backend
