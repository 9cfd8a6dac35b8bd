"""The Pod Security Standards ``restricted`` profile (which includes ``baseline``), written out
as a checker: every rule from the Kubernetes docs' "Pod Security Standards" page that a pod
spec breaks. Shared by the control plane's manifest tests and the injector's CNI-mode tests
(an injected pod in CNI mode passes; one in classic mode, with its NET_ADMIN init container,
does not)."""

from __future__ import annotations

from typing import Any

__all__ = ["restricted_violations"]

Obj = dict[str, Any]

_ALLOWED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}  # fmt: skip
_SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}  # fmt: skip
_SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def restricted_violations(spec: Obj) -> list[str]:
    """Every rule of Pod Security Standards ``restricted`` (which includes ``baseline``) that
    ``spec`` breaks, as in the Kubernetes docs' "Pod Security Standards" page."""
    bad: list[str] = []
    psc = spec.get("securityContext") or {}
    all_containers = [
        *spec.get("initContainers", []),
        *spec.get("containers", []),
        *spec.get("ephemeralContainers", []),
    ]
    # baseline
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(host):
            bad.append(f"{host} is set")
    for volume in spec.get("volumes") or []:
        types = set(volume) - {"name"}
        if types - _ALLOWED_VOLUMES:
            bad.append(f"volume {volume['name']} has type {sorted(types)}")
    for sysctl in psc.get("sysctls") or []:
        if sysctl["name"] not in _SAFE_SYSCTLS:
            bad.append(f"unsafe sysctl {sysctl['name']}")
    contexts = [("pod", psc)] + [
        (c["name"], c.get("securityContext") or {}) for c in all_containers
    ]
    for who, sc in contexts:
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            bad.append(f"{who}: hostProcess")
        se = sc.get("seLinuxOptions") or {}
        if se.get("type", "") not in _SELINUX_TYPES or se.get("user") or se.get("role"):
            bad.append(f"{who}: seLinuxOptions {se}")
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            bad.append(f"{who}: seccomp Unconfined")
        if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
            bad.append(f"{who}: appArmor Unconfined")
        if sc.get("runAsUser") == 0:
            bad.append(f"{who}: runAsUser 0")
    pod_seccomp_ok = (psc.get("seccompProfile") or {}).get("type") in (
        "RuntimeDefault",
        "Localhost",
    )
    for c in all_containers:
        sc = c.get("securityContext") or {}
        who = c["name"]
        if sc.get("privileged"):
            bad.append(f"{who}: privileged")
        if sc.get("procMount", "Default") != "Default":
            bad.append(f"{who}: procMount {sc['procMount']}")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                bad.append(f"{who}: hostPort {port['hostPort']}")
        # restricted
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{who}: allowPrivilegeEscalation is not false")
        if not sc.get("runAsNonRoot", psc.get("runAsNonRoot")):
            bad.append(f"{who}: runAsNonRoot is not true")
        if not (
            (sc.get("seccompProfile") or {}).get("type") in ("RuntimeDefault", "Localhost")
            or (pod_seccomp_ok and "seccompProfile" not in sc)
        ):
            bad.append(f"{who}: no RuntimeDefault/Localhost seccomp profile")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad.append(f"{who}: capabilities do not drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            bad.append(f"{who}: adds capabilities {caps['add']}")
    return bad
