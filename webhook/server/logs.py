"""Structured logs: one JSON object per line on stderr.

Every admission review is one line (``event: review``) with the uid, namespace, pod, operation,
result (``decision``), reason, dry-run flag, patch size and duration. Never the pod itself (it
may carry secrets in env vars) and never key material: callers pass named fields only, there
is no "log this object" helper. uvicorn's own messages go through the same formatter so that
a log pipeline sees one format.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import traceback
from typing import Any

import orjson

from webhook.admission.review import Outcome

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


class _Sink:
    """Where review lines go: one ``os.write`` per line on a real file descriptor.

    A review line is written on the request path, so it skips the logging machinery
    (LogRecord, formatter, handler lock: a noticeable share of a review's cost) and is written
    with one system call; lines below PIPE_BUF are atomic, so workers sharing stderr never
    interleave.
    """

    def __init__(self) -> None:
        self.fd: int | None = 2
        self.stream: Any = None

    def set(self, stream: Any) -> None:
        try:
            self.fd = stream.fileno()
            self.stream = None
        except (AttributeError, OSError, ValueError):  # StringIO in tests, a closed stream …
            self.fd = None
            self.stream = stream

    def write(self, line: bytes) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):  # a log pipe that went away fails no review
                os.write(self.fd, line)
        else:
            self.stream.write(line.decode())


_SINK = _Sink()
_TS_CACHE: list[Any] = [-1, ""]


def _timestamp(now: float) -> str:
    second = int(now)
    if _TS_CACHE[0] != second:
        _TS_CACHE[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    return f"{_TS_CACHE[1]}.{int((now - second) * 1000):03d}Z"


def configure_logging(level: str = "info", *, stream: Any = None) -> None:
    """Send sidemesh's and uvicorn's logs, as JSON lines, to ``stream`` (stderr)."""
    stream = stream if stream is not None else sys.stderr
    _SINK.set(stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    for name in ("sidemesh", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
    # One line per review is ours; uvicorn's access log would be a second, poorer one.
    logging.getLogger("uvicorn.access").disabled = True


def log_review(outcome: Outcome, seconds: float) -> None:
    """The review's one line: who, what was decided and why, how long it took."""
    if outcome.error is not None:  # a bug in the core: the traceback goes with it
        LOGGER.error(
            "review",
            extra={
                "event": "review",
                "uid": outcome.uid,
                "namespace": outcome.namespace,
                "pod": outcome.pod,
                "decision": outcome.result,
                "reason": outcome.reason,
            },
            exc_info=(type(outcome.error), outcome.error, outcome.error.__traceback__),
        )
        return
    if not LOGGER.isEnabledFor(logging.INFO):
        return
    line = {
        "ts": _timestamp(time.time()),
        "level": "info",
        "logger": LOGGER.name,
        "pid": os.getpid(),
        "msg": "review",
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
    }
    _SINK.write(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))


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
