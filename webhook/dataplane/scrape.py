"""What Prometheus scrapes on a sidecar's ``:15090/stats/prometheus`` in ADS mode.

Envoy's stats listener hands the request to the agent, which asks Envoy's admin for the same
page and finishes the golden metrics (:func:`webhook.telemetry.metrics.finish_scrape`): each
side's series get ``reporter`` and the sidecar's own workload, namespace and principal, which
Envoy does not record on every request since they never change for one sidecar. Everything
else passes through untouched.
"""

from __future__ import annotations

import http.client
from collections.abc import Mapping

from webhook import names
from webhook.dataplane.probes import Page
from webhook.telemetry.metrics import finish_scrape

__all__ = ["envoy_stats_page"]


def envoy_stats_page(
    admin_port: int, own: Mapping[str, Mapping[str, str]], timeout: float = 5.0
) -> Page:
    """The page: Envoy's ``/stats/prometheus`` (with the scrape's query string) plus ``own``."""

    def page(query: str) -> tuple[int, str]:
        path = names.STATS_PATH + (f"?{query}" if query else "")
        conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            text = resp.read().decode("utf-8", "replace")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            return 503, f"Envoy's admin (127.0.0.1:{admin_port}) did not answer: {exc}\n"
        finally:
            conn.close()
        if resp.status != 200:
            return resp.status, text
        return 200, finish_scrape(text, own)

    return page
