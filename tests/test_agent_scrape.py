"""The agent's ``/stats/prometheus`` (what 15090 serves in ADS mode), against a real Envoy: the
golden metrics Envoy recorded in a side's scope without ``reporter`` and the sidecar's own
labels come out as the golden metric with them, the scrape's query string reaches Envoy, and
a dead Envoy is a 503 that says which admin did not answer."""

from __future__ import annotations

import http.client
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import envoy_binary
from tests.support.envoy_alone import direct_response_config
from tests.support.ports import free_port
from tests.support.wait import wait_for
from webhook.dataplane.scrape import envoy_stats_page
from webhook.telemetry import promtext
from webhook.telemetry.metrics import HTTP_LABELS, PROMETHEUS_NAMES, own_labels, stats_logger

pytestmark = pytest.mark.envoy

PRINCIPAL = "spiffe://cluster.local/ns/demo/sa/web"


def _config(port: int, admin: int) -> dict[str, Any]:
    labels = {name: f"x-{name}" for name in HTTP_LABELS}
    labels["reporter"] = "destination"  # an inbound chain: web is the destination
    return direct_response_config(port, admin, [stats_logger("http", labels)])


@pytest.fixture
def envoy(tmp_path: Path) -> Iterator[tuple[int, int, subprocess.Popen[bytes]]]:
    port, admin = free_port(), free_port()
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(_config(port, admin)))
    argv = [envoy_binary(), "-c", str(path), "--disable-hot-restart", "-l", "error",
            "--base-id-path", str(tmp_path / "base-id")]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield port, admin, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _get(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def _answers(port: int) -> bool:
    try:
        return _get(port) == 200
    except OSError:
        return False


def test_scraped_metrics_carry_the_sidecars_own_labels(
    envoy: tuple[int, int, subprocess.Popen[bytes]],
) -> None:
    port, admin, proc = envoy
    wait_for(lambda: _answers(port), timeout=20)
    for _ in range(4):
        assert _get(port) == 200
    page = envoy_stats_page(admin, own_labels("web", "demo", PRINCIPAL))
    sent = PROMETHEUS_NAMES["response_bytes_total"]
    # Envoy's own names: sidemesh_in.response_bytes_total, envoy_sidemesh_in_… on its admin.
    status, text = page("filter=response_bytes_total")
    assert status == 200
    assert "envoy_sidemesh_in_" not in text
    assert text.count(f"# TYPE {sent} counter") == 1
    samples = list(promtext.parse(text))
    assert {s.name for s in samples} == {sent}  # the query string reached Envoy
    (series,) = samples
    assert series.value == 5 * 5  # "hello", five times (the wait's request included)
    assert series.labels["reporter"] == "destination"
    assert series.labels["destination_workload"] == "web"
    assert series.labels["destination_namespace"] == "demo"
    assert series.labels["destination_principal"] == PRINCIPAL
    assert series.labels["source_workload"] == "x-source_workload"  # Envoy's, untouched

    proc.terminate()
    proc.wait(timeout=30)
    status, text = page("")
    assert status == 503 and f"127.0.0.1:{admin}" in text
