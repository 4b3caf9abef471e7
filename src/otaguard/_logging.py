"""Log lines for people and for journald: timestamps always, JSON on request (ADR 0030).

The CLI configures the ``otaguard`` package logger (never the root one) and the HTTP
stack's (``uvicorn``) with one of two formats:

- ``text``: ``2025-01-31T12:00:00.123Z INFO otaguard.server.runner: message``
- ``json``: one object per line, ``{"time", "level", "logger", "message", ...}`` plus the
  structured fields a record carries (the access log's method, path, status, ...), which
  journald and log shippers read without parsing text.

A record's exception is one line (its type and message) unless debug logging is on: an
error from the HTTP stack is one readable line, not a traceback.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any, Final, Literal

__all__ = ["LOG_FORMATS", "LogFormat", "configure_logging"]

LogFormat = Literal["text", "json"]
LOG_FORMATS: Final = ("text", "json")
#: the fields a record may carry for the JSON view (``logger.info(..., extra={...})``)
STRUCTURED_FIELDS: Final = (
    "method", "path", "status", "duration_ms", "client", "identity", "request_id",
)  # fmt: skip
#: the loggers the CLI configures: ours and the HTTP stack's
CONFIGURED_LOGGERS: Final = ("otaguard", "uvicorn")


def _utc(record: logging.LogRecord) -> str:
    t = dt.datetime.fromtimestamp(record.created, dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _one_line(record: logging.LogRecord) -> str | None:
    if not record.exc_info or record.exc_info[1] is None:
        return None
    e = record.exc_info[1]
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


class _TextFormatter(logging.Formatter):
    def __init__(self, *, tracebacks: bool):
        super().__init__("%(message)s")
        self._tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_utc(record)} {record.levelname} {record.name}: {record.getMessage()}"
        if self._tracebacks and record.exc_info:
            return line + "\n" + self.formatException(record.exc_info)
        cause = _one_line(record)
        return f"{line}: {cause}" if cause else line


class _JsonFormatter(logging.Formatter):
    def __init__(self, *, tracebacks: bool):
        super().__init__()
        self._tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": _utc(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in STRUCTURED_FIELDS:
            if hasattr(record, name):
                doc[name] = getattr(record, name)
        cause = _one_line(record)
        if cause:
            doc["error"] = cause
            if self._tracebacks and record.exc_info:
                doc["traceback"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def configure_logging(*, level: int, fmt: LogFormat, stream: Any = None) -> None:
    """Send the ``otaguard`` and ``uvicorn`` loggers to stderr in ``fmt`` at ``level``.

    Replaces handlers an earlier call installed (the CLI may be called twice in one
    process by tests). Tracebacks are shown only at debug level.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    tracebacks = level <= logging.DEBUG
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(
        _JsonFormatter(tracebacks=tracebacks)
        if fmt == "json"
        else _TextFormatter(tracebacks=tracebacks)
    )
    handler.set_name("otaguard-cli")
    for name in CONFIGURED_LOGGERS:
        log = logging.getLogger(name)
        for old in [h for h in log.handlers if h.get_name() == "otaguard-cli"]:
            log.removeHandler(old)
        log.addHandler(handler)
        log.setLevel(level)
    # uvicorn's records stop here: no second, unformatted copy through the root logger
    logging.getLogger("uvicorn").propagate = False
