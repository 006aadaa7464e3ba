"""Logging for a replica: JSON lines for log collectors, readable text on a terminal.

Every record carries the request id of the call it was logged in (`REQUEST_ID`, set by the
servicers' wrapper from the caller's `x-request-id` metadata, which the SDK always sends), so a
caller's error can be matched with the server's lines. Per-call lines are DEBUG: the default
level (INFO) logs nothing per request.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="")
LOG_FORMATS = ("auto", "json", "text")
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message",
                                                                                "request_id"}


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, any `extra` fields,
    and the traceback as `error` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", "")
        if request_id:
            entry["request_id"] = request_id
        entry |= {k: v for k, v in vars(record).items() if k not in _STANDARD}
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = getattr(record, "request_id", "")
        return f"{text} [request {request_id}]" if request_id else text


def configure(level: str, log_format: str, stream: TextIO | None = None) -> str:
    """Send the root logger to `stream` (stderr) in `log_format`; "auto" is text on a terminal
    and JSON otherwise. Returns the format chosen."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format: expected one of {list(LOG_FORMATS)}, got {log_format!r}")
    stream = stream or sys.stderr
    if log_format == "auto":
        log_format = "text" if stream.isatty() else "json"
    handler = logging.StreamHandler(stream)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # boto3's INFO lines ("Found credentials in environment variables") say nothing an operator
    # acts on; its warnings and errors still come through (convserve logs store outages itself).
    for noisy in ("boto3", "botocore", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(root.level, logging.WARNING))
    return log_format
