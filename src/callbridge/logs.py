"""Structured lifecycle log lines: one event name and its fields.

Each event goes out as `name key=value ...` for people, and carries its fields on
the record (`record.cb_event`, `record.cb_fields`) for the JSON formatter.
"""

from __future__ import annotations

import json
import logging
from typing import Any

__all__ = ["JsonFormatter", "log_event"]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)
    return json.dumps(text) if (" " in text or not text) else text


def log_event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    if not logger.isEnabledFor(level):
        return
    shown = " ".join(f"{k}={_fmt(v)}" for k, v in fields.items() if v is not None)
    logger.log(level, "%s %s", name, shown, extra={"cb_event": name, "cb_fields": fields})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event, fields, message."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        event = getattr(record, "cb_event", None)
        if event:
            out["event"] = event
            fields = getattr(record, "cb_fields", {}) or {}
            out.update({k: v for k, v in fields.items() if v is not None})
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)
