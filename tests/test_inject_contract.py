"""docs/CONTRACTS.md §2 as tests: what the init container, the proxy agent and Envoy rely on."""

from __future__ import annotations

import json
from typing import Any

from webhook import names
from webhook.config import MeshConfig
from webhook.inject.pod import inject_pod

CFG = MeshConfig()
BUNDLE = "-----BEGIN CERTIFICATE-----\nQUJD\n-----END CERTIFICATE-----\n"


def injected(annotations: dict[str, str] | None = None) -> dict[str, Any]:
    pod = {
        "metadata": {"name": "p", "annotations": annotations or {}},
        "spec": {
            "serviceAccountName": "sa",
            "containers": [
                {
                    "name": "app",
                    "image": "app:1",
                    "ports": [
                        {"containerPort": 8080},
                        {"containerPort": 9090, "protocol": "TCP"},
                        {"containerPort": 53, "protocol": "UDP"},
                    ],
                    "readinessProbe": {"httpGet": {"path": "/r", "port": 8080}},
                }
            ],
        },
    }
    return inject_pod(pod, namespace="ns", config=CFG, bundle=BUNDLE).pod


def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {i["name"]: i for i in items}


def test_init_container_command_line() -> None:
    init = injected()["spec"]["initContainers"][0]
    assert init["name"] == names.INIT_CONTAINER
    assert init["command"] == ["sidemesh", "init-traffic"]
    assert init["args"] == [
        "--proxy-uid", "1337", "--proxy-gid", "1337",
        "--inbound-port", "15006", "--outbound-port", "15001",
        "--include-inbound-ports", "*",
        "--exclude-inbound-ports", "15020,15021,15090",
        "--include-outbound-cidrs", "*",
    ]  # fmt: skip
    init = injected(
        {
            "traffic.sidemesh.io/exclude-outbound-cidrs": "192.168.0.0/16",
            "traffic.sidemesh.io/exclude-outbound-ports": "5432",
            "traffic.sidemesh.io/exclude-inbound-ports": "9090",
        }
    )["spec"]["initContainers"][0]
    assert (
        init["args"][init["args"].index("--exclude-inbound-ports") + 1] == "15020,15021,15090,9090"
    )
    assert init["args"][-4:] == [
        "--exclude-outbound-cidrs", "192.168.0.0/16", "--exclude-outbound-ports", "5432",
    ]  # fmt: skip


def test_init_container_may_only_program_the_network() -> None:
    sc = injected()["spec"]["initContainers"][0]["securityContext"]
    assert sc["capabilities"] == {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
    assert (sc["runAsUser"], sc["runAsNonRoot"], sc["allowPrivilegeEscalation"]) == (
        0,
        False,
        False,
    )
    assert sc["privileged"] is False


def test_proxy_runs_unprivileged_as_1337() -> None:
    proxy = injected()["spec"]["initContainers"][1]
    sc = proxy["securityContext"]
    assert (sc["runAsUser"], sc["runAsGroup"], sc["runAsNonRoot"]) == (1337, 1337, True)
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}


def test_proxy_command_line_probes_and_ports() -> None:
    proxy = injected()["spec"]["initContainers"][1]
    assert proxy["command"] == ["sidemesh", "proxy"]
    assert proxy["args"] == [
        "--ca-address", "https://sidemesh.sidemesh-system.svc:443",
        "--token-file", "/var/run/secrets/sidemesh.io/token/token",
        "--bundle-file", "/var/run/sidemesh/bundle/ca.crt",
        "--cert-dir", "/var/run/sidemesh/certs",
        "--work-dir", "/var/lib/sidemesh",
        "--log-level", "warning",
        "--concurrency", "1",
    ]  # fmt: skip
    assert proxy["restartPolicy"] == "Always"
    assert proxy["readinessProbe"]["httpGet"] == {
        "path": "/healthz/ready",
        "port": 15021,
        "scheme": "HTTP",
    }
    # No startupProbe: the postStart hook holds the app back until the proxy is ready.
    assert "startupProbe" not in proxy
    assert proxy["lifecycle"]["postStart"]["exec"]["command"][:3] == ["sidemesh", "proxy", "wait"]
    assert [p["containerPort"] for p in proxy["ports"]] == [15090]


def test_proxy_environment() -> None:
    env = {e["name"]: e for e in injected()["spec"]["initContainers"][1]["env"]}
    fields = {
        k: v["valueFrom"]["fieldRef"]["fieldPath"] for k, v in env.items() if "valueFrom" in v
    }
    assert fields == {
        "POD_NAME": "metadata.name",
        "POD_NAMESPACE": "metadata.namespace",
        "POD_IP": "status.podIP",
        "POD_IPS": "status.podIPs",
        "SERVICE_ACCOUNT": "spec.serviceAccountName",
        # The labels the workload's name comes from: the sidecar's metrics name it.
        "SIDEMESH_LABEL_POD_TEMPLATE_HASH": "metadata.labels['pod-template-hash']",
        "SIDEMESH_LABEL_STATEFULSET_POD_NAME": (
            "metadata.labels['statefulset.kubernetes.io/pod-name']"
        ),
        "SIDEMESH_LABEL_APP_NAME": "metadata.labels['app.kubernetes.io/name']",
        "SIDEMESH_LABEL_APP": "metadata.labels['app']",
    }
    values = {k: v["value"] for k, v in env.items() if "value" in v}
    assert values.pop(names.ENV_APP_PROBES) == json.dumps(
        {"/app-health/app/readyz": {"httpGet": {"path": "/r", "port": 8080, "scheme": "HTTP"},
                                    "timeoutSeconds": 1}}, separators=(",", ":"),
    )  # fmt: skip
    assert values == {
        "SIDEMESH_TRUST_DOMAIN": "cluster.local",
        "SIDEMESH_DISCOVERY_ADDRESS": "sidemesh-discovery.sidemesh-system.svc:15012",
        "SIDEMESH_INBOUND_MTLS": "PERMISSIVE",
        "SIDEMESH_MESH_CIDRS": "10.0.0.0/8",
        "SIDEMESH_PLAINTEXT_PORTS": "53",
        "SIDEMESH_APP_PORTS": "8080,9090",
        "SIDEMESH_CERT_TTL_SECONDS": "86400",
    }


def test_volumes_and_where_they_are_mounted() -> None:
    pod = injected()
    vols = by_name(pod["spec"]["volumes"])
    assert vols["sidemesh-certs"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Mi"}
    assert vols["sidemesh-token"]["projected"]["sources"] == [
        {
            "serviceAccountToken": {
                "audience": "sidemesh-ca",
                "expirationSeconds": 3600,
                "path": "token",
            }
        }
    ]
    bundle_ref = "metadata.annotations['sidemesh.io/trust-bundle']"
    assert vols["sidemesh-bundle"]["downwardAPI"]["items"] == [
        {"path": "ca.crt", "fieldRef": {"apiVersion": "v1", "fieldPath": bundle_ref}}
    ]
    assert vols["sidemesh-work"] == {"name": "sidemesh-work", "emptyDir": {}}
    mounts = {
        m["name"]: (m["mountPath"], m.get("readOnly", False))
        for m in pod["spec"]["initContainers"][1]["volumeMounts"]
    }
    assert mounts == {
        "sidemesh-certs": ("/var/run/sidemesh/certs", False),
        "sidemesh-token": ("/var/run/secrets/sidemesh.io/token", True),
        "sidemesh-bundle": ("/var/run/sidemesh/bundle", True),
        "sidemesh-work": ("/var/lib/sidemesh", False),
    }
    # The token is the proxy's alone.
    for c in pod["spec"]["containers"] + pod["spec"]["initContainers"][:1]:
        assert "volumeMounts" not in c


def test_annotations_carry_the_bundle_status_and_scrape_settings() -> None:
    ann = injected()["metadata"]["annotations"]
    assert ann["sidemesh.io/trust-bundle"] == BUNDLE
    assert ann["kubectl.kubernetes.io/default-container"] == "app"
    assert (ann["prometheus.io/scrape"], ann["prometheus.io/port"], ann["prometheus.io/path"]) == (
        "true",
        "15090",
        "/stats/prometheus",
    )
    status = json.loads(ann["sidemesh.io/status"])
    assert status["initContainers"] == ["sidemesh-init", "sidemesh-proxy"]
    assert status["volumes"] == [
        "sidemesh-certs",
        "sidemesh-token",
        "sidemesh-bundle",
        "sidemesh-work",
    ]
