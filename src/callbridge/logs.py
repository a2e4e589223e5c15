"""Structured lifecycle log lines: one event name and its fields.

Each event goes out as `name key=value ...` for people, and carries its fields on
the record (`record.cb_event`, `record.cb_fields`) for the JSON formatter.

Every line, in both modes, names the process that wrote it: the process-wide instance id
(`set_instance`, called at start with `settings.instance_id`), shown as `[id]` by
`TextFormatter` and as `instance` by `JsonFormatter`. A line about one call carries its SID
as the field `call_sid`.
"""

from __future__ import annotations

import contextvars
import json
import logging
from typing import Any

__all__ = [
    "JsonFormatter",
    "TextFormatter",
    "bind_call",
    "call_extra",
    "instance",
    "json_mode",
    "log_event",
    "set_instance",
]

_instance: str | None = None
# The call whose task is logging: set once a call knows its SID (`Call`), inherited by every
# task it starts, so that any line logged on a call's behalf carries `call_sid`.
_call_sid: contextvars.ContextVar[str | None] = contextvars.ContextVar("callbridge_call_sid", default=None)


def call_extra(call_sid: str | None) -> dict[str, Any]:
    """`extra=` for a plain `logger.error(...)` about one call: its SID becomes a field."""
    return {"cb_fields": {"call_sid": call_sid}} if call_sid else {}


def bind_call(call_sid: str | None) -> None:
    """Lines logged from now on in this task (and tasks it starts) carry `call_sid`."""
    _call_sid.set(call_sid)


def _fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The record's event fields, with the bound call's SID when the line names none."""
    fields = dict(getattr(record, "cb_fields", None) or {})
    bound = _call_sid.get()
    if bound and fields.get("call_sid") is None:
        fields["call_sid"] = bound
    return fields


def set_instance(instance_id: str) -> None:
    """Name this process on every log line from now on (its instance id; one per worker)."""
    global _instance
    _instance = instance_id or None


def instance() -> str | None:
    return _instance


def json_mode() -> bool:
    """Whether the root logger writes JSON lines (`--json-logs`)."""
    return any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)
    return json.dumps(text) if (" " in text or not text) else text


def log_event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    if not logger.isEnabledFor(level):
        return
    if fields.get("call_sid") is None and _call_sid.get():
        fields["call_sid"] = _call_sid.get()  # logged on a call's behalf: name the call
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
        if _instance is not None:
            out["instance"] = _instance
        event = getattr(record, "cb_event", None)
        fields = _fields_of(record)
        if event:
            out["event"] = event
        else:
            out["message"] = record.getMessage()
        out.update({k: v for k, v in fields.items() if v is not None})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """`HH:MM:SS LEVEL   [instance] message` for people."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(cb_instance)s%(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        record.cb_instance = f"[{_instance}] " if _instance is not None else ""
        text = super().format(record)
        if getattr(record, "cb_event", None):
            return text  # log_event wrote its fields, the call's SID among them
        sid = (getattr(record, "cb_fields", None) or {}).get("call_sid") or _call_sid.get()
        if sid:
            # A plain line about a call (`call_extra`, or logged on its behalf): add the field.
            head, sep, rest = text.partition("\n")  # before a traceback, if any
            text = f"{head} call_sid={sid}{sep}{rest}"
        return text
