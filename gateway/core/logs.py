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

The access log (``access_log: true`` in the config, or ``CREDITGATE_ACCESS_LOG=1``) is one
record per metered request on the ``creditgate.access`` logger (:func:`log_access`), always
rendered as JSON by the setups above whatever the format of the other logs.
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
    "ACCESS_LOGGER",
    "REQUEST_ID",
    "JsonFormatter",
    "TextFormatter",
    "access_log_enabled",
    "configure_logging",
    "log_access",
    "log_format",
    "uvicorn_log_config",
]

REQUEST_ID: ContextVar[str | None] = ContextVar("creditgate_request_id", default=None)
"""The id of the request the current task serves (set by the middleware)."""

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

ACCESS_LOGGER = "creditgate.access"
_access = logging.getLogger(ACCESS_LOGGER)
_TRUE = frozenset({"1", "true", "yes", "on"})

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


def access_log_enabled(configured: bool) -> bool:
    """Is the access log on: ``configured`` (the config's ``access_log``) or
    ``$CREDITGATE_ACCESS_LOG`` set to 1, true, yes or on."""
    return configured or os.environ.get("CREDITGATE_ACCESS_LOG", "").strip().lower() in _TRUE


def log_access(
    *,
    request_id: str | None,
    method: str,
    route: str,
    org: str | None,
    user: str | None,
    feature: str,
    status: int,
    cost: int,
    refunded: bool,
    latency_ms: float | None = None,
    upstream_status: int | None = None,
    code: str | None = None,
) -> None:
    """Write one access record: ``METHOD route status`` as the message, every argument as a
    member of the JSON line. ``cost`` is what was charged (0 when refunded or refused);
    ``code`` the problem+json code of a request creditgate answered itself (401, 402...),
    for which ``latency_ms`` is None; ``org`` is None when the caller is unknown."""
    _access.info(
        "%s %s %s",
        method,
        route,
        status,
        extra={
            "request_id": request_id, "method": method, "route": route, "org": org,
            "user": user, "feature": feature, "status": status, "cost": cost,
            "refunded": refunded, "latency_ms": latency_ms, "upstream_status": upstream_status,
            "code": code,
        },
    )  # fmt: skip


def _formatter_path(fmt: str | None) -> str:
    name = "JsonFormatter" if log_format(fmt) == "json" else "TextFormatter"
    return f"{__name__}.{name}"


def uvicorn_log_config(level: str = "info", fmt: str | None = None) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` dict for uvicorn and creditgate, on stderr."""
    lvl = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "creditgate": {"()": _formatter_path(fmt)},
            "creditgate_json": {"()": f"{__name__}.JsonFormatter"},
        },
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "creditgate",
                "stream": "ext://sys.stderr",
            },
            "access": {
                "class": "logging.StreamHandler",
                "formatter": "creditgate_json",
                "stream": "ext://sys.stderr",
            },
        },
        "loggers": {
            "uvicorn": {"handlers": ["stderr"], "level": lvl, "propagate": False},
            "uvicorn.error": {"level": lvl},
            "uvicorn.access": {"handlers": ["stderr"], "level": lvl, "propagate": False},
            # Written only when enabled (access_log), so never filtered by the level.
            ACCESS_LOGGER: {"handlers": ["access"], "level": "INFO", "propagate": False},
        },
        "root": {"handlers": ["stderr"], "level": lvl},
    }


def configure_logging(level: str = "info", fmt: str | None = None) -> None:
    """Send every logger's records to stderr in the chosen format (idempotent)."""
    logging.config.dictConfig(uvicorn_log_config(level, fmt))
    # Quieten libraries that are chatty at INFO.
    for noisy in ("asyncio", "stripe"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
