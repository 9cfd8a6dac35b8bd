"""Names, ports and paths that users and the other sidemesh roles rely on.

These are conventions (docs/design.md lists them for users): the injector writes them into
pods, the init container, the proxy agent and the Envoy bootstrap read them. Keep them stable;
change one here and every role follows.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "APP_HEALTH_PREFIX",
    "BUNDLE_DIR",
    "BUNDLE_FILE",
    "CERTS_DIR",
    "CONTROL_PLANE_NAMESPACE",
    "DEFAULT_CONTAINER",
    "DEFAULT_SERVICE_ACCOUNT",
    "ENV_APP_PORTS",
    "ENV_APP_PROBES",
    "ENV_CA_ADDRESS",
    "ENV_CERT_TTL",
    "ENV_INBOUND_MTLS",
    "ENV_LOG_LEVEL",
    "ENV_MESH_CIDRS",
    "ENV_PLAINTEXT_PORTS",
    "ENV_POD_IP",
    "ENV_POD_IPS",
    "ENV_POD_NAME",
    "ENV_POD_NAMESPACE",
    "ENV_SERVICE_ACCOUNT",
    "ENV_TRUST_DOMAIN",
    "HEALTH_PATH",
    "INBOUND_PASSTHROUGH_SOURCE",
    "INIT_CONTAINER",
    "INJECT",
    "MIRROR_POD",
    "NAMESPACE_LABEL",
    "PROBE_KINDS",
    "PROXY_CONTAINER",
    "SERVICE_NAME",
    "STATS_PATH",
    "STATUS",
    "TOKEN_AUDIENCE",
    "TOKEN_DIR",
    "TOKEN_EXPIRATION_SECONDS",
    "TOKEN_FILE",
    "TRUST_BUNDLE_ANNOTATION",
    "VOLUME_BUNDLE",
    "VOLUME_CERTS",
    "VOLUME_TOKEN",
    "VOLUME_WORK",
    "WEBHOOK_CONFIGURATION",
    "WORK_DIR",
    "control_plane_dns_names",
    "is_trust_domain",
    "parse_spiffe_id",
    "spiffe_id",
    "trust_domain_prefix",
]

# --- labels and annotations -------------------------------------------------------------
NAMESPACE_LABEL: Final = "sidemesh-injection"  # "enabled" | "disabled"
INJECT: Final = "sidemesh.io/inject"  # pod label (first) or annotation: "true" | "false"
STATUS: Final = "sidemesh.io/status"  # JSON record of what was injected
# The root PEM, exposed to the proxy as a file by a downwardAPI volume.
TRUST_BUNDLE_ANNOTATION: Final = "sidemesh.io/trust-bundle"
DEFAULT_CONTAINER: Final = "kubectl.kubernetes.io/default-container"
# CNI mode: the ``sidemesh init-traffic`` arguments of the pod, as a JSON list. The node's CNI
# plugin programs exactly these rules while the pod's sandbox is created.
CNI_CAPTURE: Final = "sidemesh.io/cni-capture"
MIRROR_POD: Final = "kubernetes.io/config.mirror"

# --- containers and volumes ---------------------------------------------------------------
INIT_CONTAINER: Final = "sidemesh-init"
PROXY_CONTAINER: Final = "sidemesh-proxy"
VALIDATE_CONTAINER: Final = "sidemesh-validate"  # CNI mode: checks the redirect, unprivileged
VALIDATE_UID: Final = 1338  # any non-root uid but the proxy's: its traffic must be captured
VOLUME_CERTS: Final = "sidemesh-certs"  # emptyDir, medium Memory: key + workload cert
VOLUME_TOKEN: Final = "sidemesh-token"  # projected SA token, audience sidemesh-ca
VOLUME_BUNDLE: Final = "sidemesh-bundle"  # downwardAPI: the trust bundle annotation as ca.crt
VOLUME_WORK: Final = "sidemesh-work"  # emptyDir: Envoy bootstrap and SDS files

# --- where those volumes are mounted in the proxy container -----------------------------
CERTS_DIR: Final = "/var/run/sidemesh/certs"
TOKEN_DIR: Final = "/var/run/secrets/sidemesh.io/token"
TOKEN_FILE: Final = TOKEN_DIR + "/token"
BUNDLE_DIR: Final = "/var/run/sidemesh/bundle"
BUNDLE_FILE: Final = BUNDLE_DIR + "/ca.crt"
WORK_DIR: Final = "/var/lib/sidemesh"

# --- identity ------------------------------------------------------------------------------
TOKEN_AUDIENCE: Final = "sidemesh-ca"
TOKEN_EXPIRATION_SECONDS: Final = 3600
#: A pod whose spec names no service account runs as this one (Kubernetes' own default).
DEFAULT_SERVICE_ACCOUNT: Final = "default"

# --- control plane ---------------------------------------------------------------------------
CONTROL_PLANE_NAMESPACE: Final = "sidemesh-system"
SERVICE_NAME: Final = "sidemesh"
WEBHOOK_CONFIGURATION: Final = "sidemesh-injector"
#: The discovery (xDS) Deployment, its Service and ServiceAccount; ADS on DISCOVERY_PORT.
DISCOVERY_NAME: Final = "sidemesh-discovery"
DISCOVERY_PORT: Final = 15012

# --- environment of the proxy container (read by `sidemesh proxy`) ----------------------
ENV_POD_NAME: Final = "POD_NAME"  # downward API metadata.name
ENV_POD_NAMESPACE: Final = "POD_NAMESPACE"  # downward API metadata.namespace
ENV_POD_IP: Final = "POD_IP"  # downward API status.podIP
ENV_POD_IPS: Final = "POD_IPS"  # downward API status.podIPs (comma-separated, dual stack)
ENV_SERVICE_ACCOUNT: Final = "SERVICE_ACCOUNT"  # downward API spec.serviceAccountName
ENV_TRUST_DOMAIN: Final = "SIDEMESH_TRUST_DOMAIN"
ENV_CA_ADDRESS: Final = "SIDEMESH_CA_ADDRESS"
ENV_DISCOVERY_ADDRESS: Final = "SIDEMESH_DISCOVERY_ADDRESS"  # host:port of ADS; "" = static
ENV_INBOUND_MTLS: Final = "SIDEMESH_INBOUND_MTLS"  # PERMISSIVE | STRICT
ENV_MESH_CIDRS: Final = "SIDEMESH_MESH_CIDRS"  # comma-separated CIDRs
ENV_PLAINTEXT_PORTS: Final = "SIDEMESH_PLAINTEXT_PORTS"  # comma-separated, never mTLS outbound
ENV_APP_PORTS: Final = "SIDEMESH_APP_PORTS"  # comma-separated TCP containerPorts of the app
ENV_APP_PROBES: Final = "SIDEMESH_APP_PROBES"  # JSON: {"/app-health/<c>/<kind>": <probe>}
ENV_CERT_TTL: Final = "SIDEMESH_CERT_TTL_SECONDS"  # requested workload cert lifetime
ENV_LOG_LEVEL: Final = "SIDEMESH_LOG_LEVEL"

#: The path prefix of rewritten probes on the probe port: /app-health/<container>/<kind>.
APP_HEALTH_PREFIX: Final = "/app-health"
PROBE_KINDS: Final = {
    "livenessProbe": "livez",
    "readinessProbe": "readyz",
    "startupProbe": "startupz",
}

#: The proxy's readiness endpoint on the health port.
HEALTH_PATH: Final = "/healthz/ready"
#: Prometheus endpoint on the stats port.
STATS_PATH: Final = "/stats/prometheus"
#: Envoy's upstream bind source for the hop to the app; exempt from capture.
INBOUND_PASSTHROUGH_SOURCE: Final = "127.0.0.6"


def control_plane_dns_names(service: str) -> tuple[str, ...]:
    """The names a control-plane Service in :data:`CONTROL_PLANE_NAMESPACE` is reached by,
    from the shortest to the fully qualified (what its serving certificate must name)."""
    svc = f"{service}.{CONTROL_PLANE_NAMESPACE}"
    return (service, svc, f"{svc}.svc", f"{svc}.svc.cluster.local")


# --- SPIFFE ids: spiffe://<trust domain>/ns/<namespace>/sa/<service account> ------------------
# The CA writes them into certificates, the agent asks for them and checks what it got, Envoy
# matches peers on them: built and read only here, so every role agrees on one format.

_SPIFFE: Final = "spiffe://"
# DNS-1123 label (namespaces) and subdomain (service accounts): what Kubernetes allows, so a
# SPIFFE path segment can never smuggle a '/' or a '..'. Matched with fullmatch: '$' would
# accept a trailing newline.
_LABEL: Final = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_SUBDOMAIN: Final = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def is_trust_domain(text: str) -> bool:
    """A lower-case DNS-like name without '/', ':' or spaces (``cluster.local``)."""
    return bool(text) and text == text.lower() and not any(c in text for c in "/: \n\r\t")


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``; ValueError naming the
    part that cannot be one (a namespace or service account name Kubernetes would refuse)."""
    if not is_trust_domain(trust_domain):
        raise ValueError(f"{trust_domain!r} is not a trust domain")
    if not _LABEL.fullmatch(namespace):
        raise ValueError(f"{namespace!r} is not a Kubernetes namespace name")
    if not _SUBDOMAIN.fullmatch(service_account) or ".." in service_account:
        raise ValueError(f"{service_account!r} is not a Kubernetes service account name")
    return f"{_SPIFFE}{trust_domain}/ns/{namespace}/sa/{service_account}"


def parse_spiffe_id(uri: str) -> tuple[str, str, str]:
    """``(trust_domain, namespace, service_account)`` of a sidemesh SPIFFE id; ValueError if
    it is none."""
    if not uri.startswith(_SPIFFE):
        raise ValueError(f"{uri!r} is not a SPIFFE id")
    parts = uri[len(_SPIFFE) :].split("/")
    if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa" or not parts[0]:
        raise ValueError(f"{uri!r} is not of the form spiffe://<td>/ns/<ns>/sa/<sa>")
    trust_domain, _, namespace, _, service_account = parts
    spiffe_id(trust_domain, namespace, service_account)  # validates the segments
    return trust_domain, namespace, service_account


def trust_domain_prefix(trust_domain: str) -> str:
    """What every SPIFFE id of ``trust_domain`` starts with (Envoy's peer matcher)."""
    return f"{_SPIFFE}{trust_domain}/"
