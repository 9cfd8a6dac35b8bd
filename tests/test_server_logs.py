"""The review log: one JSON line per review with who/what/why/how long — never the pod."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

from tests.support.webhook_https import admission_review, https_webhook, simple_pod
from webhook.server.logs import configure_logging


def _reviews(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if line.get("event") == "review"]


def test_one_line_per_review_with_the_facts_and_without_the_pod(tmp_path: Path) -> None:
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    try:
        secret_pod = simple_pod()
        secret_pod["spec"]["containers"][0]["env"] = [{"name": "PASSWORD", "value": "hunter2"}]
        bad = simple_pod()
        bad["metadata"]["annotations"] = {"sidemesh.io/proxy-cpu": "lots"}
        with https_webhook(tmp_path / "pki") as running, running.client() as c:
            c.post("/mutate", json=admission_review(secret_pod, uid="u-inject", namespace="shop"))
            c.post("/mutate", json=admission_review(simple_pod(hostNetwork=True), uid="u-skip"))
            c.post("/mutate", json=admission_review(bad, uid="u-deny", dry_run=True))
            c.post("/mutate", content=b"{", headers={"content-type": "application/json"})
            pem = (running.cert_dir / "tls.key").read_text()
    finally:
        text = stream.getvalue()
        configure_logging("info")
    lines = [json.loads(line) for line in text.splitlines()]
    reviews = _reviews(lines)
    assert [(r["uid"], r["decision"], r["reason"]) for r in reviews] == [
        ("u-inject", "injected", "namespace-policy"),
        ("u-skip", "skipped", "host-network"),
        ("u-deny", "denied", "bad-annotation"),
        ("", "invalid", "not-json"),
    ]
    first = reviews[0]
    assert first["namespace"] == "shop" and first["pod"] == "web-5f7b9c-"
    assert first["operation"] == "CREATE" and first["patch_ops"] > 0
    assert 0 < first["duration_ms"] < 1000 and isinstance(first["pid"], int)
    assert reviews[2]["dry_run"] is True
    assert "hunter2" not in text and "nginx" not in text  # never the pod
    assert "PRIVATE KEY" not in text and pem.splitlines()[1] not in text  # never key material


def test_a_uvicorn_line_is_one_json_object() -> None:
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    try:
        logging.getLogger("uvicorn.error").info("Started server process [%d]", 42)
    finally:
        configure_logging("info")
    (line,) = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert line["msg"] == "Started server process [42]" and line["level"] == "info"
    assert line["logger"] == "uvicorn.error" and "color_message" not in line
    assert logging.getLogger("uvicorn.access").disabled  # our review line replaces it
