"""Server logging: plain or JSON lines, each carrying the request id of the RPC that logged it."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
import uuid

__all__ = ["REQUEST_ID", "configure_logging", "new_request_id", "request_id"]

#: The id of the RPC being handled on this thread ("-" outside RPCs); gRPC runs each RPC in its own context.
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("convrpc_request_id", default="-")

#: Record attributes a call's log line may carry; the JSON format emits them as fields.
CALL_FIELDS = ("rpc", "code", "duration_ms", "peer", "bytes_in", "bytes_out")


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def request_id() -> str:
    """The current RPC's id, or a fresh one outside an RPC (so an error is always traceable)."""
    current = REQUEST_ID.get()
    return current if current != "-" else new_request_id()


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id and a call's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        for name in CALL_FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def configure_logging(level: str = "info", fmt: str = "plain", stream=None) -> logging.Handler:
    """Send every log record to ``stream`` (stderr) in ``fmt`` ("plain" or "json"); replaces root handlers."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(PLAIN_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
