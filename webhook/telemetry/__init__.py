"""Telemetry compiled by the control plane into each sidecar's Envoy config: golden metrics by
source and destination, JSON access logs, traces. Every module here only builds plain dicts in
Envoy's JSON shape, and the layering test holds them to that."""
