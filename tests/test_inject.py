"""The injection core on hand-written pods: what a user of the webhook would see."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonpatch
import pytest

from webhook import names
from webhook.config import MeshConfig, load_config
from webhook.errors import AnnotationError, ConflictError, InjectionError
from webhook.inject import memo
from webhook.inject.pod import inject_pod, read_status, uninject_pod

CFG = MeshConfig()
BUNDLE = "-----BEGIN CERTIFICATE-----\nTEST\n-----END CERTIFICATE-----\n"


def pod(**spec_extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "web",
            "labels": {"app": "web"},
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
        },
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "image": "nginx",
                    "ports": [{"containerPort": 8080, "name": "http"}],
                    "livenessProbe": {"httpGet": {"path": "/live", "port": "http"}},
                    "futureField": {"kept": True},
                }
            ],
            **spec_extra,
        },
    }


def inject(p: dict[str, Any], config: MeshConfig = CFG, ns: str = "default") -> Any:
    before = copy.deepcopy(p)
    result = inject_pod(p, namespace=ns, config=config, bundle=BUNDLE)
    assert p == before, "the input pod must never be modified"
    assert jsonpatch.apply_patch(p, result.patch) == result.pod
    return result


def names_of(items: list[dict[str, Any]]) -> list[str]:
    return [c["name"] for c in items]


def env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_native_sidecar_is_the_default_and_goes_right_after_init() -> None:
    p = pod(initContainers=[{"name": "migrate", "image": "busybox"}])
    out = inject(p).pod
    assert names_of(out["spec"]["initContainers"]) == [
        names.INIT_CONTAINER,
        names.PROXY_CONTAINER,
        "migrate",
    ]
    proxy = out["spec"]["initContainers"][1]
    assert proxy["restartPolicy"] == "Always"
    # Held back by a postStart hook that polls readiness, not by a once-a-second startupProbe.
    assert "startupProbe" not in proxy
    assert proxy["lifecycle"]["postStart"]["exec"]["command"][:3] == ["sidemesh", "proxy", "wait"]
    assert names_of(out["spec"]["containers"]) == ["app"]
    assert out["spec"]["containers"][0]["futureField"] == {"kept": True}


def test_classic_mode_puts_the_proxy_last_and_hold_mode_first_with_a_wait_hook() -> None:
    p = pod()
    p["metadata"]["annotations"] = {"sidemesh.io/native-sidecar": "false"}
    out = inject(p).pod
    assert names_of(out["spec"]["containers"]) == ["app", names.PROXY_CONTAINER]
    assert names_of(out["spec"]["initContainers"]) == [names.INIT_CONTAINER]
    assert "restartPolicy" not in out["spec"]["containers"][1]
    p["metadata"]["annotations"]["sidemesh.io/hold-application-until-proxy-starts"] = "true"
    out = inject(p).pod
    proxy = out["spec"]["containers"][0]
    assert proxy["name"] == names.PROXY_CONTAINER
    assert proxy["lifecycle"]["postStart"]["exec"]["command"][:3] == ["sidemesh", "proxy", "wait"]
    assert out["metadata"]["annotations"][names.DEFAULT_CONTAINER] == "app"


def test_probes_point_at_the_proxy_and_the_originals_reach_it_with_ports_resolved() -> None:
    p = pod()
    p["spec"]["containers"][0]["readinessProbe"] = {
        "grpc": {"port": 9000, "service": "health"},
        "periodSeconds": 7,
    }
    p["spec"]["containers"][0]["startupProbe"] = {"exec": {"command": ["true"]}}
    out = inject(p).pod
    app = out["spec"]["containers"][0]
    assert app["livenessProbe"] == {
        "httpGet": {"path": "/app-health/app/livez", "port": 15020, "scheme": "HTTP"}
    }
    assert app["readinessProbe"]["periodSeconds"] == 7
    assert app["startupProbe"] == {"exec": {"command": ["true"]}}
    probes = json.loads(env(out["spec"]["initContainers"][1])[names.ENV_APP_PROBES])
    assert probes == {
        "/app-health/app/livez": {
            "httpGet": {"path": "/live", "port": 8080, "scheme": "HTTP"},
            "timeoutSeconds": 1,
        },
        "/app-health/app/readyz": {
            "grpc": {"port": 9000, "service": "health"},
            "timeoutSeconds": 1,
        },
    }


def test_probe_rewriting_can_be_turned_off_per_pod() -> None:
    p = pod()
    p["metadata"]["annotations"] = {"sidemesh.io/rewrite-probes": "false"}
    out = inject(p).pod
    assert out["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] == "http"
    assert env(out["spec"]["initContainers"][1])[names.ENV_APP_PROBES] == "{}"


def test_injected_pod_gives_an_empty_patch_and_uninject_restores_it() -> None:
    p = pod()
    first = inject(p)
    again = inject(first.pod)
    assert again.patch == []
    assert again.decision.reason == "already-injected"
    assert uninject_pod(first.pod) == p


def test_reinjection_after_a_config_change_refreshes_only_what_we_added() -> None:
    p = pod()
    first = inject(p)
    newer = load_config({"proxy": {"image": "registry.example/sidemesh:9.9"}})
    second = inject(first.pod, config=newer)
    assert second.decision.inject
    assert second.pod["spec"]["initContainers"][1]["image"] == "registry.example/sidemesh:9.9"
    assert uninject_pod(second.pod) == p
    assert inject(second.pod, config=newer).patch == []


def test_patch_appends_to_arrays_and_escapes_annotation_keys() -> None:
    p = pod(volumes=[{"name": "data", "emptyDir": {}}], initContainers=[])
    p["metadata"]["annotations"] = {"x": "y"}
    ops = inject(p).patch
    paths = [op["path"] for op in ops]
    assert "/spec/volumes/-" in paths and "/spec/volumes" not in paths
    assert "/spec/initContainers/0" in paths and "/spec/initContainers/1" in paths
    assert "/metadata/annotations/sidemesh.io~1status" in paths
    assert not any(path.startswith("/metadata/managedFields") for path in paths)


def test_skips_are_answers_with_stable_reasons() -> None:
    assert inject(pod(hostNetwork=True)).decision.reason == "host-network"
    mirror = pod()
    mirror["metadata"]["annotations"] = {names.MIRROR_POD: "abc"}
    assert inject(mirror).decision.reason == "mirror-pod"
    assert inject(pod(), ns="kube-system").decision.reason == "ignored-namespace"
    out = pod()
    out["metadata"]["labels"][names.INJECT] = "false"
    result = inject(out)
    assert (result.decision.inject, result.decision.reason, result.patch) == (
        False,
        "opted-out",
        [],
    )


def test_bad_annotation_names_the_annotation_and_the_value() -> None:
    p = pod()
    p["metadata"]["annotations"] = {"traffic.sidemesh.io/exclude-inbound-ports": "80,http"}
    with pytest.raises(AnnotationError, match=r"exclude-inbound-ports='80,http'"):
        inject(p)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: p["spec"]["containers"][0]["ports"].append({"containerPort": 15090}), "15090"),
        (lambda p: p["spec"].update(securityContext={"runAsUser": 1337}), "runAsUser 1337"),
        (lambda p: p["spec"]["containers"].append({"name": "sidemesh-proxy"}), "sidemesh-proxy"),
        (lambda p: p["spec"].update(volumes=[{"name": "sidemesh-work"}]), "sidemesh-work"),
    ],
)
def test_conflicts_are_refused_with_the_reason(mutate: Any, message: str) -> None:
    p = pod()
    mutate(p)
    with pytest.raises(ConflictError, match=message):
        inject(p)


def test_a_forged_status_cannot_make_uninject_remove_user_containers() -> None:
    p = pod()
    p["metadata"]["annotations"] = {
        names.STATUS: json.dumps({"version": "0", "containers": ["app"]})
    }
    with pytest.raises(InjectionError, match="never adds"):
        read_status(p)
    with pytest.raises(InjectionError):
        inject(p)


def _objects(value: Any) -> list[Any]:
    """Every dict and list inside ``value`` (itself included)."""
    if isinstance(value, dict):
        return [value, *(o for v in value.values() for o in _objects(v))]
    if isinstance(value, list):
        return [value, *(o for v in value for o in _objects(v))]
    return []


def _scribble(value: Any) -> None:
    """What a careless caller might do to a result: change every dict and list in it."""
    for obj in _objects(value):
        if isinstance(obj, dict):
            obj["scribbled"] = True
        else:
            obj.append("scribbled")


def test_what_one_pod_gets_never_leaks_into_the_next() -> None:
    # The containers and volumes are built from strings worked out once per (config,
    # overrides); every list and dict must still be this pod's own, or a caller changing one
    # result would change the next, and a YAML dump of two pods would show &id001 anchors.
    first, second = inject(pod()), inject(pod())
    ours = {id(o) for o in _objects(first.pod) + _objects(first.patch)}
    added = [first.pod["spec"]["initContainers"], first.pod["spec"]["volumes"]]
    shared = [o for o in _objects(second.pod) + _objects(second.patch) if id(o) in ours]
    assert shared == [], "two injections share a list or dict"
    expected = copy.deepcopy(second.pod), copy.deepcopy(second.patch)
    _scribble(added)
    _scribble(first.patch)
    third = inject(pod())
    assert (third.pod, third.patch) == expected
    assert "scribbled" not in json.dumps([third.pod, third.patch])


def test_remembered_results_stay_bounded() -> None:
    """Pods with annotations each bring new overrides and configs come and go: the core's
    memo (webhook.inject.memo) never grows past its bounds, and results stay correct."""
    pod = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "app", "image": "a"}]}}
    for i in range(300):
        config = MeshConfig(trust_domain=f"td{i % 50}.local")
        annotated = {**pod, "metadata": {"annotations": {"sidemesh.io/proxy-cpu": f"{i + 1}m"}}}
        for p in (pod, annotated):
            injected = inject_pod(p, namespace="shop", config=config, bundle="")
            spec = injected.pod["spec"]
            (proxy,) = [c for c in spec["initContainers"] if c["name"] == names.PROXY_CONTAINER]
            env = {e["name"]: e.get("value") for e in proxy["env"]}
            assert env["SIDEMESH_TRUST_DOMAIN"] == f"td{i % 50}.local"
    assert memo.entries() <= 16 + 64
