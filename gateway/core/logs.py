"""Logging setup: plain text or one JSON object per line, with the request id.

``CREDITGATE_LOG_FORMAT=json`` (or ``fmt="json"``) selects JSON lines; anything else gives
text. Every record carries the id of the request being served when the middleware set
:data:`REQUEST_ID` (a context variable: each ASGI request runs in its own task, so the id
follows the request into every coroutine it awaits), or when a caller passes
``extra={"request_id": ...}``. Other ``extra`` fields (``org``, ``feature``...) become JSON
members too.

``configure_logging()`` sets up the root logger for CLI commands; ``uvicorn_log_config()``
returns the dict ``uvicorn.run(log_config=...)`` takes, so uvicorn's own loggers and
creditgate's share one format.
"""

from __future__ import annotations

import json
import logging
import logging.config
import os
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "REQUEST_ID",
    "JsonFormatter",
    "TextFormatter",
    "configure_logging",
    "log_format",
    "uvicorn_log_config",
]

REQUEST_ID: ContextVar[str | None] = ContextVar("creditgate_request_id", default=None)
"""The id of the request the current task serves (set by the middleware)."""

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "color_message", "taskName"}
)


def log_format(fmt: str | None = None) -> str:
    """``json`` or ``text``: ``fmt`` if given, else ``$CREDITGATE_LOG_FORMAT``."""
    chosen = (fmt or os.environ.get("CREDITGATE_LOG_FORMAT") or "text").strip().lower()
    return "json" if chosen == "json" else "text"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, request_id, extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a single line of JSON."""
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        if request_id:
            doc["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in doc and key != "request_id":
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The text format, with ``[request_id]`` appended when there is one."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as text."""
        line = super().format(record)
        request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        return f"{line} [{request_id}]" if request_id else line


def _formatter_path(fmt: str | None) -> str:
    name = "JsonFormatter" if log_format(fmt) == "json" else "TextFormatter"
    return f"{__name__}.{name}"


def uvicorn_log_config(level: str = "info", fmt: str | None = None) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` dict for uvicorn and creditgate, on stderr."""
    lvl = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"creditgate": {"()": _formatter_path(fmt)}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "creditgate",
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            "uvicorn": {"handlers": ["stderr"], "level": lvl, "propagate": False},
            "uvicorn.error": {"level": lvl},
            "uvicorn.access": {"handlers": ["stderr"], "level": lvl, "propagate": False},
        },
        "root": {"handlers": ["stderr"], "level": lvl},
    }


def configure_logging(level: str = "info", fmt: str | None = None) -> None:
    """Send every logger's records to stderr in the chosen format (idempotent)."""
    logging.config.dictConfig(uvicorn_log_config(level, fmt))
    # Quieten libraries that are chatty at INFO.
    for noisy in ("asyncio", "stripe"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
