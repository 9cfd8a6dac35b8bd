"""Structured logs: one JSON object per line on stderr.

Every admission review is one line (``event: review``) with the uid, namespace, pod, operation,
result (``decision``), reason, dry-run flag, patch size and duration. Never the pod itself (it
may carry secrets in env vars) and never key material: callers pass named fields only, there
is no "log this object" helper. uvicorn's own messages go through the same formatter so that
a log pipeline sees one format.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from typing import Any

import orjson

from webhook.admission import Outcome

__all__ = ["LOGGER", "JsonFormatter", "configure_logging", "log_invalid", "log_review"]

LOGGER = logging.getLogger("sidemesh")

# Attributes every LogRecord has; anything else a caller passed in ``extra`` is a field.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "taskName"}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "pid", "msg", <extra fields>}`` as one line of JSON."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,  # tells workers apart with --workers N
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and key != "color_message":
                out[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            out["error"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return orjson.dumps(out, default=str).decode()


def configure_logging(level: str = "info", *, stream: Any = None) -> None:
    """Send sidemesh's and uvicorn's logs, as JSON lines, to ``stream`` (stderr)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("sidemesh", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
    # One line per review is ours; uvicorn's access log would be a second, poorer one.
    logging.getLogger("uvicorn.access").disabled = True


def log_review(outcome: Outcome, seconds: float) -> None:
    if not LOGGER.isEnabledFor(logging.INFO):
        return
    level = logging.ERROR if outcome.error is not None else logging.INFO
    LOGGER.log(
        level,
        "review",
        extra={
            "event": "review",
            "uid": outcome.uid,
            "namespace": outcome.namespace,
            "pod": outcome.pod,
            "operation": outcome.operation,
            "decision": outcome.result,
            "reason": outcome.reason,
            "dry_run": outcome.dry_run,
            "patch_ops": outcome.patch_ops,
            "duration_ms": round(seconds * 1000, 3),
        },
        exc_info=(
            (type(outcome.error), outcome.error, outcome.error.__traceback__)
            if outcome.error is not None
            else None
        ),
    )


def log_invalid(status: int, reason: str, message: str, uid: str, seconds: float) -> None:
    LOGGER.warning(
        "invalid review",
        extra={
            "event": "review",
            "uid": uid,
            "decision": "invalid",
            "reason": reason,
            "status": status,
            "error": message,
            "duration_ms": round(seconds * 1000, 3),
        },
    )
