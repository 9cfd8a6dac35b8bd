"""Properties of the core on generated pods (hypothesis): whatever the pod, injection is
reversible, idempotent, described exactly by its patch, and loses no field it does not own."""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
from hypothesis import HealthCheck, given, settings, strategies as st

from webhook.config import MeshConfig, load_config
from webhook.inject.pod import inject_pod, uninject_pod

CFG = MeshConfig()
OTHER_CFG = load_config(
    {"proxy": {"image": "example/other:2", "native_sidecar": False}, "inbound_mtls": "STRICT"}
)
BUNDLE = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
RESERVED = set(CFG.ports.all())

dns = st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True).filter(
    lambda s: not s.startswith("sidemesh")
)
scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=8))
json_value = st.recursive(
    scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
# Fields Kubernetes does not know (yet): they must survive untouched.
unknown = st.dictionaries(
    st.from_regex(r"x[A-Z][a-z]{1,6}", fullmatch=True), json_value, max_size=2
)
port_number = st.integers(1, 65535).filter(lambda p: p not in RESERVED)
# Annotation keys, including ones that need JSON-pointer escaping.
ann_key = st.from_regex(r"[a-z]{1,6}(\.io)?/[a-z~]{1,6}|[a-z~]{1,8}", fullmatch=True)


@st.composite
def probe(draw: Any, port_names: list[str]) -> dict[str, Any]:
    port = draw(st.one_of(port_number, st.sampled_from(port_names or ["missing"])))
    handler = draw(
        st.sampled_from(
            [
                {"httpGet": {"path": "/h", "port": port}},
                {"httpGet": {"port": port, "scheme": "HTTPS", "host": "elsewhere"}},
                {"tcpSocket": {"port": port}},
                {"grpc": {"port": draw(port_number)}},
                {"exec": {"command": ["true"]}},
            ]
        )
    )
    extra = draw(st.fixed_dictionaries({}, optional={"periodSeconds": st.integers(1, 9)}))
    return {**handler, **extra}


@st.composite
def container(draw: Any, name: str) -> dict[str, Any]:
    c: dict[str, Any] = {"name": name, "image": "example/app:1", **draw(unknown)}
    ports = draw(st.lists(port_number, max_size=3, unique=True))
    if ports:
        c["ports"] = [
            {
                "containerPort": p,
                "name": f"p{i}",
                **draw(st.sampled_from([{}, {"protocol": "UDP"}])),
            }
            for i, p in enumerate(ports)
        ]
    names = [p["name"] for p in c.get("ports", [])]
    for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
        if draw(st.booleans()):
            c[kind] = draw(probe(names))
    if draw(st.booleans()):
        c["securityContext"] = {"runAsUser": draw(st.integers(0, 2000).filter(lambda u: u != 1337))}
    return c


@st.composite
def pods(draw: Any) -> dict[str, Any]:
    names = draw(st.lists(dns, min_size=1, max_size=5, unique=True))
    n_app = draw(st.integers(1, len(names)))
    spec: dict[str, Any] = {
        "containers": [draw(container(n)) for n in names[:n_app]],
        **draw(unknown),
    }
    inits = []
    for n in names[n_app:]:
        c = draw(container(n))
        if draw(st.booleans()):
            c["restartPolicy"] = "Always"
        inits.append(c)
    if inits or draw(st.booleans()):
        spec["initContainers"] = inits
    if draw(st.booleans()):
        spec["volumes"] = [
            {"name": v, "emptyDir": {}} for v in draw(st.lists(dns, max_size=2, unique=True))
        ]
    pod: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod", "spec": spec, **draw(unknown)}
    if draw(st.booleans()):
        meta: dict[str, Any] = {"name": "p", "managedFields": [{"manager": "m"}]}
        annotations = draw(st.dictionaries(ann_key, st.text(max_size=5), max_size=3))
        for key, value in draw(
            st.lists(
                st.sampled_from(
                    [
                        ("sidemesh.io/native-sidecar", "false"),
                        ("sidemesh.io/hold-application-until-proxy-starts", "true"),
                        ("sidemesh.io/rewrite-probes", "false"),
                        ("traffic.sidemesh.io/exclude-inbound-ports", "8080,9090"),
                        ("prometheus.io/scrape", "false"),
                        ("kubectl.kubernetes.io/default-container", names[0]),
                    ]
                ),
                max_size=3,
            )
        ):
            annotations[key] = value
        if annotations or draw(st.booleans()):
            meta["annotations"] = annotations
        pod["metadata"] = meta
    return pod


SETTINGS = settings(
    max_examples=int(__import__("os").environ.get("HYPOTHESIS_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@SETTINGS
@given(pods())
def test_patch_reproduces_the_injected_pod_and_the_input_is_untouched(pod: dict[str, Any]) -> None:
    before = copy.deepcopy(pod)
    result = inject_pod(pod, namespace="app", config=CFG, bundle=BUNDLE)
    assert pod == before
    assert result.decision.inject
    assert jsonpatch.apply_patch(pod, result.patch) == result.pod


@SETTINGS
@given(pods())
def test_injection_is_idempotent_and_reversible(pod: dict[str, Any]) -> None:
    injected = inject_pod(pod, namespace="app", config=CFG, bundle=BUNDLE).pod
    again = inject_pod(injected, namespace="app", config=CFG, bundle=BUNDLE)
    assert again.patch == [] and again.pod == injected
    assert again.decision.reason == "already-injected"
    assert uninject_pod(injected) == pod


@SETTINGS
@given(pods())
def test_reinjection_with_another_config_only_refreshes_what_sidemesh_added(
    pod: dict[str, Any],
) -> None:
    injected = inject_pod(pod, namespace="app", config=CFG, bundle=BUNDLE).pod
    refreshed = inject_pod(injected, namespace="app", config=OTHER_CFG, bundle=BUNDLE)
    assert jsonpatch.apply_patch(injected, refreshed.patch) == refreshed.pod
    assert uninject_pod(refreshed.pod) == pod
    direct = inject_pod(pod, namespace="app", config=OTHER_CFG, bundle=BUNDLE).pod
    assert refreshed.pod == direct


@SETTINGS
@given(pods())
def test_no_field_sidemesh_does_not_own_is_lost(pod: dict[str, Any]) -> None:
    out = inject_pod(pod, namespace="app", config=CFG, bundle=BUNDLE).pod
    for key, value in pod.items():
        if key not in ("spec", "metadata"):
            assert out[key] == value
    for key, value in pod["spec"].items():
        if key not in ("containers", "initContainers", "volumes"):
            assert out["spec"][key] == value
    by_name = {
        c["name"]: c for f in ("containers", "initContainers") for c in out["spec"].get(f, [])
    }
    for field in ("containers", "initContainers"):
        for c in pod["spec"].get(field) or []:
            got = by_name[c["name"]]
            for key, value in c.items():
                if not key.endswith("Probe"):
                    assert got[key] == value, (c["name"], key)
    for v in pod["spec"].get("volumes") or []:
        assert v in out["spec"]["volumes"]
    meta = pod.get("metadata", {})
    for key, value in meta.items():
        if key != "annotations":
            assert out["metadata"][key] == value
    for key, value in (meta.get("annotations") or {}).items():
        assert out["metadata"]["annotations"][key] == value


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


@SETTINGS
@given(pods(), st.data())
def test_malformed_pods_give_an_error_never_a_crash(pod: dict[str, Any], data: Any) -> None:
    """Any field replaced by junk: injection works or raises a SidemeshError, nothing else."""
    from webhook.errors import SidemeshError
    from webhook.inject.workloads import inject_object, uninject_object

    path = data.draw(st.sampled_from(_paths(pod)[1:]))
    junk = data.draw(json_value)
    node: Any = pod
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = junk
    before = copy.deepcopy(pod)
    try:
        result = inject_object(pod, namespace="app", config=CFG, bundle=BUNDLE)
    except SidemeshError:
        return
    assert pod == before
    if result.templates and result.templates[0].patch:
        assert jsonpatch.apply_patch(pod, result.templates[0].patch) == result.obj
        assert uninject_object(result.obj).obj == pod
