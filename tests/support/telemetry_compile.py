"""Telemetry as the control plane compiles it, without a network: the demo mesh's model, one
sidecar's listeners, and the loggers and labels in a chain (shared by the telemetry tests)."""

from __future__ import annotations

from typing import Any

from webhook.config import load_config
from webhook.discovery.build import build_model
from webhook.discovery.compiler import proxy_options, proxy_resources
from webhook.discovery.filesource import FileSource
from webhook.discovery.model import MeshModel
from webhook.discovery.store import KINDS, ObjectStore

__all__ = ["compiled_listeners", "demo_model", "stat_tags", "telemetry_loggers"]


def demo_model() -> MeshModel:
    store = ObjectStore()
    FileSource(store, None).load()
    return build_model({k: store.list(k) for k in KINDS})


def compiled_listeners(pod_name: str, **telemetry: Any) -> dict[str, Any]:
    """The listeners the demo mesh's pod ``pod_name`` gets, with this telemetry config."""
    model = demo_model()
    pod = model.pods[("demo", pod_name)]
    opts = proxy_options(pod, trust_domain="cluster.local", plaintext_ports=(53,))
    cfg = load_config({"telemetry": telemetry}).telemetry
    return proxy_resources(model, opts, pod, model.services.values(), cfg).listeners


def telemetry_loggers(chain: dict[str, Any]) -> list[dict[str, Any]]:
    """Telemetry's loggers of a chain (others, e.g. access policy's audit log, left out)."""
    proxy = chain["filters"][-1]["typed_config"]
    return [
        x
        for x in proxy.get("access_log", [])
        if x["name"] == "envoy.access_loggers.stats"
        or "reporter" in x["typed_config"].get("log_format", {}).get("json_format", {})
    ]


def stat_tags(logger: dict[str, Any]) -> dict[str, str]:
    """Label → value format of the stat with every label: the duration histogram of an HTTP
    chain, the connection counter of a TCP one."""
    config = logger["typed_config"]
    stat = (config.get("histograms") or config["counters"])[0]["stat"]
    return {t["name"]: t["value_format"] for t in stat["tags"]}
