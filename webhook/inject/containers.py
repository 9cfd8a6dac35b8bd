"""The containers and volumes sidemesh adds to a pod, as plain dicts (docs/CONTRACTS.md §2).

The init container's args are the ``sidemesh init-traffic`` command line and the proxy's args
and environment are the ``sidemesh proxy`` contract: other roles parse exactly what is built
here, so every literal comes from :mod:`webhook.names` or the config. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from webhook import names
from webhook.config import MeshConfig
from webhook.inject import memo
from webhook.inject.annotations import Overrides
from webhook.telemetry.workload import LABEL_ENV

__all__ = [
    "METRICS_PORT_NAME",
    "SIDEMESH_VOLUMES",
    "init_container",
    "proxy_container",
    "validate_container",
    "volumes",
]

#: Name of the Prometheus port on the proxy (a Kubernetes port name: at most 15 characters).
METRICS_PORT_NAME: Final = "http-envoy-prom"
SIDEMESH_VOLUMES: Final = (
    names.VOLUME_CERTS,
    names.VOLUME_TOKEN,
    names.VOLUME_BUNDLE,
    names.VOLUME_WORK,
)


def _csv(items: tuple[int, ...] | tuple[str, ...] | str) -> str:
    return items if isinstance(items, str) else ",".join(map(str, items))


def _flags(*pairs: tuple[str, str]) -> list[str]:
    return [item for pair in pairs for item in pair]


def _resources(ov: Overrides) -> dict[str, Any]:
    limits = {}
    if ov.cpu_limit:
        limits["cpu"] = ov.cpu_limit
    if ov.memory_limit:
        limits["memory"] = ov.memory_limit
    res: dict[str, Any] = {"requests": {"cpu": ov.cpu_request, "memory": ov.memory_request}}
    if limits:
        res["limits"] = limits
    return res


def init_args(config: MeshConfig, ov: Overrides) -> list[str]:
    """``sidemesh init-traffic`` arguments (the capture settings of this pod)."""
    px, ports = config.proxy, config.ports
    exclude_in = list(ports.never_captured_inbound())
    exclude_in += [p for p in ov.exclude_inbound_ports if p not in exclude_in]
    args = _flags(
        ("--proxy-uid", str(px.uid)),
        ("--proxy-gid", str(px.gid)),
        ("--inbound-port", str(ports.inbound)),
        ("--outbound-port", str(ports.outbound)),
        ("--include-inbound-ports", _csv(ov.include_inbound_ports)),
        ("--exclude-inbound-ports", _csv(tuple(exclude_in))),
        ("--include-outbound-cidrs", _csv(ov.include_outbound_cidrs)),
    )
    if ov.exclude_outbound_cidrs:
        args += ["--exclude-outbound-cidrs", _csv(ov.exclude_outbound_cidrs)]
    if ov.exclude_outbound_ports:
        args += ["--exclude-outbound-ports", _csv(ov.exclude_outbound_ports)]
    return args


@dataclass(frozen=True, slots=True)
class _Strings:
    """The strings of our containers that depend only on (config, overrides), worked out once.

    Only immutable values (str, int, tuples) live here: every container is still built as a
    fresh literal per pod, so no list or dict is ever shared between two pods. Sharing them
    would be unsafe, not just impolite: a YAML dump of a ``kind: List`` holding two injected
    templates would turn shared objects into ``&id001`` anchors, and a caller mutating one
    result would change the next.
    """

    init_args: tuple[str, ...]
    proxy_args: tuple[str, ...]
    mesh_cidrs: str
    plaintext_ports: str
    cert_ttl: str


# Pods without sidemesh annotations share one Overrides per config (annotations.read_overrides),
# so they all find their strings remembered (webhook.inject.memo says why that is safe).
@memo.per_pair(bound=64)
def _strings(config: MeshConfig, ov: Overrides) -> _Strings:
    px = config.proxy
    return _Strings(
        init_args=tuple(init_args(config, ov)),
        proxy_args=(
            *("--ca-address", config.ca_address),
            *("--token-file", names.TOKEN_FILE),
            *("--bundle-file", names.BUNDLE_FILE),
            *("--cert-dir", names.CERTS_DIR),
            *("--work-dir", names.WORK_DIR),
            *("--log-level", ov.log_level),
            *("--concurrency", str(px.concurrency)),
        ),
        mesh_cidrs=",".join(config.mesh_cidrs),
        plaintext_ports=",".join(map(str, config.plaintext_ports)),
        cert_ttl=str(px.cert_ttl_seconds),
    )


def init_container(config: MeshConfig, ov: Overrides) -> dict[str, Any]:
    """``sidemesh-init``: installs the capture rules, then exits.

    It needs NET_ADMIN and NET_RAW as root to program iptables in the pod's network namespace;
    everything else is dropped, and it cannot escalate. Its root filesystem stays writable
    because iptables takes its lock file under ``/run`` (Istio's init container does the same;
    the alternative is one more volume). It gets the proxy's resources, so it never raises the
    pod's effective request above what the proxy already needs.
    """
    return {
        "name": names.INIT_CONTAINER,
        "image": config.proxy.init_image,
        "imagePullPolicy": config.proxy.image_pull_policy,
        "command": ["sidemesh", "init-traffic"],
        "args": list(_strings(config, ov).init_args),
        "resources": _resources(ov),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            "privileged": False,
            "readOnlyRootFilesystem": False,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "runAsUser": 0,
        },
    }


#: CNI mode: what the Pod Security "restricted" level asks of every container.
_RUNTIME_DEFAULT_SECCOMP: Final = "RuntimeDefault"


def validate_container(config: MeshConfig, ov: Overrides) -> dict[str, Any]:
    """CNI mode's ``sidemesh-validate``: checks that the node's CNI plugin redirected the pod's
    traffic, then exits; fails the pod with a message saying so when it did not.

    It holds no capability and runs as a non-root uid that is *not* the proxy's, because its
    check is a connection that the capture rules must redirect (traffic of the proxy's uid is
    never captured). Its args are those ``sidemesh-init`` would get: it works out from them
    which connection must be captured. It uses the proxy's image (the init image may be an
    iptables-only image) and the proxy's resources, like ``sidemesh-init``.
    """
    uid = names.VALIDATE_UID
    return {
        "name": names.VALIDATE_CONTAINER,
        "image": ov.proxy_image,
        "imagePullPolicy": config.proxy.image_pull_policy,
        "command": ["sidemesh", "cni", "validate"],
        "args": list(_strings(config, ov).init_args),
        "resources": _resources(ov),
        "securityContext": {
            **_unprivileged(uid, uid),
            "seccompProfile": {"type": _RUNTIME_DEFAULT_SECCOMP},
        },
    }


def _unprivileged(uid: int, gid: int) -> dict[str, Any]:
    """The security context of the containers that need no privilege (the proxy, the CNI-mode
    check): every capability dropped, read-only root, a fixed non-root uid/gid."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsGroup": gid,
        "runAsNonRoot": True,
        "runAsUser": uid,
    }


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}


def _health_probe(port: int, period: int, failures: int) -> dict[str, Any]:
    get = {"path": names.HEALTH_PATH, "port": port, "scheme": "HTTP"}
    return {
        "httpGet": get,
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def _proxy_env(
    config: MeshConfig, ov: Overrides, s: _Strings, app_ports: str, app_probes: str
) -> list[dict[str, Any]]:
    """What the agent learns from its environment: the pod's own facts by the downward API,
    then the mesh's settings and this pod's app ports and probes."""
    return [
        _field_env(names.ENV_POD_NAME, "metadata.name"),
        _field_env(names.ENV_POD_NAMESPACE, "metadata.namespace"),
        _field_env(names.ENV_POD_IP, "status.podIP"),
        _field_env(names.ENV_POD_IPS, "status.podIPs"),
        _field_env(names.ENV_SERVICE_ACCOUNT, "spec.serviceAccountName"),
        {"name": names.ENV_TRUST_DOMAIN, "value": config.trust_domain},
        {"name": names.ENV_DISCOVERY_ADDRESS, "value": config.discovery_address},
        {"name": names.ENV_INBOUND_MTLS, "value": ov.inbound_mtls},
        {"name": names.ENV_MESH_CIDRS, "value": s.mesh_cidrs},
        {"name": names.ENV_PLAINTEXT_PORTS, "value": s.plaintext_ports},
        {"name": names.ENV_APP_PORTS, "value": app_ports},
        {"name": names.ENV_APP_PROBES, "value": app_probes},
        {"name": names.ENV_CERT_TTL, "value": s.cert_ttl},
        # The labels the sidecar's workload name comes from (its metrics name it).
        *(_field_env(var, f"metadata.labels['{label}']") for label, var in LABEL_ENV.items()),
    ]


def proxy_container(
    config: MeshConfig,
    ov: Overrides,
    *,
    app_ports: str,
    app_probes: str,
    native: bool,
    hold: bool,
) -> dict[str, Any]:
    """``sidemesh-proxy``: the agent (identity, bootstrap) and Envoy, as uid/gid 1337.

    ``native``: a native sidecar (``restartPolicy: Always`` in ``initContainers``), so apps
    start after the proxy and Jobs still complete. ``hold`` (classic mode): the proxy goes
    first. Both get a postStart hook, ``sidemesh proxy wait``, that returns as soon as Envoy is
    ready; the kubelet starts the next container only once it has returned.

    Why a hook and no startupProbe: the kubelet runs a startup probe once per period (1 s at
    least) and starts the next container only after a probe passed, so the app would start up
    to a whole second after the proxy became ready; the hook polls every 50 ms. A hook that
    fails (the proxy not ready within its deadline) gets the container killed and restarted,
    as a failed startup probe would.

    Written as literals (every list and dict fresh for this pod) with the strings that
    depend only on the config and overrides worked out once: it runs once per admitted pod.
    """
    px, s = config.proxy, _strings(config, ov)
    health = config.ports.health
    container: dict[str, Any] = {
        "name": names.PROXY_CONTAINER,
        "image": ov.proxy_image,
        "imagePullPolicy": px.image_pull_policy,
        "command": ["sidemesh", "proxy"],
        "args": list(s.proxy_args),
        "env": _proxy_env(config, ov, s, app_ports, app_probes),
        "ports": [
            {"containerPort": config.ports.stats, "name": METRICS_PORT_NAME, "protocol": "TCP"}
        ],
        "readinessProbe": _health_probe(health, 2, 30),
        "resources": _resources(ov),
        "securityContext": _unprivileged(px.uid, px.gid),
        "volumeMounts": [
            {"name": names.VOLUME_CERTS, "mountPath": names.CERTS_DIR},
            {"name": names.VOLUME_TOKEN, "mountPath": names.TOKEN_DIR, "readOnly": True},
            {"name": names.VOLUME_BUNDLE, "mountPath": names.BUNDLE_DIR, "readOnly": True},
            {"name": names.VOLUME_WORK, "mountPath": names.WORK_DIR},
        ],
    }
    if ov.cni:
        # CNI mode promises a pod that passes Pod Security "restricted", which wants a seccomp
        # profile on every container when the pod sets none for all of them.
        container["securityContext"]["seccompProfile"] = {"type": _RUNTIME_DEFAULT_SECCOMP}
    if native:
        container["restartPolicy"] = "Always"
    if native or hold:
        # Up to 10 minutes for the first certificate and Envoy start.
        wait = ["sidemesh", "proxy", "wait", "--timeout", str(_START_DEADLINE_SECONDS)]
        container["lifecycle"] = {"postStart": {"exec": {"command": wait}}}
    return container


_START_DEADLINE_SECONDS: Final = 600


_BUNDLE_REF: Final = f"metadata.annotations['{names.TRUST_BUNDLE_ANNOTATION}']"


def volumes() -> list[dict[str, Any]]:
    """The four volumes, in SIDEMESH_VOLUMES order (all mounted into the proxy only)."""
    return [
        {"name": names.VOLUME_CERTS, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        {
            "name": names.VOLUME_TOKEN,
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": names.TOKEN_AUDIENCE,
                            "expirationSeconds": names.TOKEN_EXPIRATION_SECONDS,
                            "path": "token",
                        }
                    }
                ]
            },
        },
        {
            "name": names.VOLUME_BUNDLE,
            "downwardAPI": {
                "items": [
                    {"path": "ca.crt", "fieldRef": {"apiVersion": "v1", "fieldPath": _BUNDLE_REF}}
                ]
            },
        },
        {"name": names.VOLUME_WORK, "emptyDir": {}},
    ]
