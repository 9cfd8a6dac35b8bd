"""The CNI protocol (spec 1.0) as plain values: what a runtime hands a plugin, and what the
plugin answers. Pure: no I/O; :mod:`webhook.cni.plugin` reads the environment and stdin.

A runtime runs a plugin once per operation with ``CNI_COMMAND`` (ADD, DEL, CHECK, VERSION),
``CNI_CONTAINERID``, ``CNI_NETNS`` (a path to the pod's network namespace), ``CNI_IFNAME``,
``CNI_ARGS`` (``K=V;K=V``; the kubelet puts ``K8S_POD_NAMESPACE`` and ``K8S_POD_NAME`` there) and
``CNI_PATH`` in the environment, and the network configuration on stdin. In a chain
(a ``.conflist``), each plugin after the first gets the previous plugin's result as
``prevResult`` in that configuration; a plugin that changes nothing about addresses (sidemesh)
answers ADD with that result unchanged. Errors are a JSON object on stdout and a non-zero exit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from webhook import names

__all__ = [
    "CNI_VERSION",
    "COMMANDS",
    "ERR_DECODE",
    "ERR_INVALID_CONFIG",
    "ERR_INVALID_ENV",
    "ERR_IO",
    "ERR_TRY_AGAIN",
    "ERR_UNSUPPORTED_VERSION",
    "SUPPORTED_VERSIONS",
    "CNIError",
    "NetConf",
    "Request",
    "error_result",
    "families",
    "parse_args",
    "parse_request",
    "version_result",
]

CNI_VERSION: Final = "1.0.0"
#: Versions whose ADD result has the same shape (``ips``, ``interfaces``): we pass it through.
SUPPORTED_VERSIONS: Final = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
COMMANDS: Final = ("ADD", "DEL", "CHECK", "VERSION")

# Well-known error codes (spec: "Error" section); 100+ would be ours.
ERR_UNSUPPORTED_VERSION: Final = 1
ERR_INVALID_ENV: Final = 4
ERR_IO: Final = 5
ERR_DECODE: Final = 6
ERR_INVALID_CONFIG: Final = 7
ERR_TRY_AGAIN: Final = 11

#: Namespaces the plugin never asks the API server about: the injector never injects their
#: pods, and the cluster's own components (and sidemesh's control plane, which the API server
#: calls for every pod) must get a network even while the API server is unreachable.
DEFAULT_EXCLUDE_NAMESPACES: Final = (
    "kube-system",
    "kube-public",
    "kube-node-lease",
    names.CONTROL_PLANE_NAMESPACE,
)


class CNIError(Exception):
    """A failure to report to the runtime: ``code`` (spec's table), ``msg`` and ``details``."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


@dataclass(frozen=True)
class NetConf:
    """sidemesh's entry in the conflist (the keys after ``type`` are ours)."""

    cni_version: str
    name: str
    agent_socket: str
    """Path of the node agent's look-up socket (served by ``sidemesh cni install``)."""
    timeout_seconds: float = 5.0
    """How long the agent's API call may take before ADD fails (the kubelet then retries)."""
    exclude_namespaces: tuple[str, ...] = DEFAULT_EXCLUDE_NAMESPACES
    prev_result: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Request:
    command: str
    container_id: str
    netns: str
    ifname: str
    args: Mapping[str, str] = field(default_factory=dict)
    conf: NetConf | None = None

    @property
    def pod(self) -> tuple[str, str] | None:
        """(namespace, name) of a Kubernetes pod, None when the runtime is not the kubelet."""
        ns, name = self.args.get("K8S_POD_NAMESPACE"), self.args.get("K8S_POD_NAME")
        return (ns, name) if ns and name else None


def parse_args(text: str) -> dict[str, str]:
    """``CNI_ARGS``: ``IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web-0``."""
    out: dict[str, str] = {}
    for item in filter(None, text.split(";")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CNIError(ERR_INVALID_ENV, f"CNI_ARGS: {item!r} is not KEY=VALUE")
        out[key] = value
    return out


def _conf(raw: str) -> NetConf:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise CNIError(ERR_DECODE, f"network configuration on stdin is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CNIError(ERR_DECODE, "network configuration on stdin must be a JSON object")
    version = data.get("cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CNIError(
            ERR_UNSUPPORTED_VERSION,
            f"cniVersion {version!r} is not supported",
            f"supported: {', '.join(SUPPORTED_VERSIONS)}",
        )
    agent_socket = data.get("agent_socket")
    if not isinstance(agent_socket, str) or not agent_socket:
        raise CNIError(
            ERR_INVALID_CONFIG, "sidemesh: key 'agent_socket' (the node agent's socket) is missing"
        )
    timeout = data.get("timeout_seconds", 5.0)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 60:
        raise CNIError(ERR_INVALID_CONFIG, f"sidemesh: timeout_seconds {timeout!r}: 0-60 seconds")
    exclude = data.get("exclude_namespaces", list(DEFAULT_EXCLUDE_NAMESPACES))
    if not isinstance(exclude, list) or not all(isinstance(n, str) for n in exclude):
        raise CNIError(ERR_INVALID_CONFIG, "sidemesh: exclude_namespaces must be a list of names")
    prev = data.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CNIError(ERR_INVALID_CONFIG, "prevResult must be a JSON object")
    return NetConf(
        cni_version=version,
        name=str(data.get("name", "")),
        agent_socket=agent_socket,
        timeout_seconds=float(timeout),
        exclude_namespaces=tuple(exclude),
        prev_result=prev,
    )


def parse_request(env: Mapping[str, str], stdin: str) -> Request:
    """The runtime's request; raises :class:`CNIError` naming what is wrong."""
    command = env.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CNIError(ERR_INVALID_ENV, f"CNI_COMMAND {command!r}: expected one of {COMMANDS}")
    if command == "VERSION":
        return Request(command, "", "", "")
    for key in ("CNI_CONTAINERID", "CNI_IFNAME"):
        if not env.get(key):
            raise CNIError(ERR_INVALID_ENV, f"{key} is not set")
    netns = env.get("CNI_NETNS", "")
    if command != "DEL" and not netns:  # DEL must succeed even when the namespace is gone
        raise CNIError(ERR_INVALID_ENV, "CNI_NETNS is not set")
    conf = _conf(stdin)
    if command in ("ADD", "CHECK") and conf.prev_result is None:
        raise CNIError(
            ERR_INVALID_CONFIG,
            "sidemesh must be chained after the primary plugin (no prevResult on stdin)",
        )
    return Request(
        command,
        env["CNI_CONTAINERID"],
        netns,
        env["CNI_IFNAME"],
        parse_args(env.get("CNI_ARGS", "")),
        conf,
    )


def families(prev_result: Mapping[str, Any]) -> tuple[int, ...]:
    """The address families the pod got from the primary plugin (4, 6 or both)."""
    out = set()
    for ip in prev_result.get("ips") or ():
        address = str(ip.get("address", "")) if isinstance(ip, dict) else ""
        if address:
            out.add(6 if ":" in address else 4)
    return tuple(sorted(out)) or (4,)


def version_result() -> dict[str, Any]:
    return {"cniVersion": CNI_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}


def error_result(error: CNIError, version: str = CNI_VERSION) -> dict[str, Any]:
    out: dict[str, Any] = {"cniVersion": version, "code": error.code, "msg": error.msg}
    if error.details:
        out["details"] = error.details
    return out
