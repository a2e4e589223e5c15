"""Writes as data: what each queued operation does to a call's row, and which
database errors are worth retrying."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import DBAPIError

from callbridge.store.schema import RECORD_FIELDS, TIMES, as_time, aware

__all__ = ["Op", "apply_op", "is_transient"]

Op = dict[str, Any]


def _new_row(call_sid: str, op: Op) -> dict[str, Any]:
    return {
        "call_sid": call_sid,
        "direction": "inbound",
        "status": "active",
        "started_at": as_time(op.get("at")),
        "transcript": [],
        "timeline": [],
        "twilio_events": [],
        "metrics": {},
        "instance": op.get("instance"),
    }


def apply_op(row: dict[str, Any] | None, op: Op) -> dict[str, Any] | None:
    """The row after `op` (None: the operation leaves a missing row missing). Pure: the
    writer, the read-your-writes overlay of `get` and the spool replay all use it."""
    kind, sid = op["op"], op["call_sid"]
    at = as_time(op.get("at"))
    if kind == "record":
        rec = op["record"]
        if row is not None and row.get("status") == "ended" and rec.get("status") != "ended":
            return row  # never reopen a closed record (e.g. a replayed start record)
        row = dict(row) if row is not None else _new_row(sid, op)
        for name in RECORD_FIELDS:
            row[name] = rec.get(name)
        row["from_number"], row["to_number"] = rec.get("from"), rec.get("to")
        for name in TIMES:
            row[name] = as_time(rec.get(name))
        row["transcript"] = list(rec.get("transcript") or [])
        row["timeline"] = list(rec.get("timeline") or [])
        row["metrics"] = dict(rec.get("metrics") or {})
        row["instance"] = op.get("instance")
    elif kind == "status":
        form = op.get("form") or {}
        if row is None:
            row = _new_row(sid, op)
            row["direction"] = "outbound" if form.get("Direction", "").startswith("outbound") else "inbound"
            row["from_number"], row["to_number"] = form.get("From"), form.get("To")
        else:
            row = dict(row)
        event = {"status": op["status"], **(op.get("details") or {})}
        events = list(row.get("twilio_events") or [])
        if event not in events:  # a spool replayed twice adds nothing
            events.append(event)
        row["twilio_status"], row["twilio_events"] = op["status"], events
    elif kind == "placeholder":
        if row is not None:
            return row
        row = _new_row(sid, op)
        row["direction"], row["from_number"], row["to_number"] = op["direction"], op["from"], op["to"]
    elif kind == "close":
        if row is not None and row.get("status") == "ended" and not op.get("force"):
            return row
        row = dict(row) if row is not None else _new_row(sid, op)
        for name in ("direction", "from_number", "to_number"):
            if op.get(name) and not row.get(name):
                row[name] = op[name]
        row["status"], row["end_reason"], row["end_detail"] = "ended", op["reason"], op["detail"]
        row["ended_at"] = at
        started = aware(row.get("started_at"))
        if started is not None and at is not None:
            row["duration_s"] = round((at - started).total_seconds(), 3)
    elif kind == "answered_by":
        # Answering-machine detection's verdict (Twilio's AnsweredBy); the latest one stands.
        row = dict(row) if row is not None else _new_row(sid, op)
        row["answered_by"] = op["answered_by"]
    elif kind == "analysis":
        # The post-call analysis: the first to arrive (API fetch or webhook) wins.
        if row is None or row.get("analysis"):
            return row
        row = dict(row)
        row["analysis"] = dict(op["analysis"])
    else:
        raise ValueError(f"unknown store operation {kind!r}")
    row["updated_at"] = at or datetime.now(UTC)
    return row


# -- which errors are worth retrying ---------------------------------------------------------

# SQLSTATE classes: 08 connection exception, 40 transaction rollback (serialization,
# deadlock), 53 insufficient resources, 57 operator intervention (admin shutdown,
# "the database system is starting up"), 58 system error.
_TRANSIENT_SQLSTATE = ("08", "40", "53", "57", "58")
_REFUSED_SQLSTATE = ("22", "23")  # data exception, integrity constraint violation


def _sqlstate(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", None)
    for candidate in (exc, orig, getattr(orig, "__cause__", None)):
        code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(code, str):
            return code
    return None


def is_transient(exc: BaseException) -> bool:
    """The database is unreachable, hung or restarting (not: it refused this value)."""
    if isinstance(exc, OSError | TimeoutError | ConnectionError):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        code = _sqlstate(exc)
        if code is not None:
            return code[:2] in _TRANSIENT_SQLSTATE
        # SQLite: "database is locked", "disk I/O error", "unable to open database file"
        orig = exc.orig
        if isinstance(orig, OSError | TimeoutError):
            return True
        return type(exc).__name__ in ("OperationalError", "InterfaceError")
    # asyncpg's own connection errors, when they escape SQLAlchemy's wrapping
    module = type(exc).__module__
    return module.startswith("asyncpg") and "Connection" in type(exc).__name__
