"""The `calls` table (as the migrations leave it) and how a row is shown."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import JSON, Boolean, DateTime, Float, Index, Integer, String, Table, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["CALLS", "CORE_COLUMNS", "FLEET_CALLS", "INSTANCES", "OPTIONAL_COLUMNS", "CallRow", "row_to_dict"]

# Columns every row has a value for; a record the database refuses is written with these
# first, then the others one by one.
CORE_COLUMNS = (
    "direction",
    "status",
    "end_reason",
    "twilio_status",
    "started_at",
    "answered_at",
    "ended_at",
    "duration_s",
    "instance",
    "updated_at",
)
OPTIONAL_COLUMNS = (
    "stream_sid",
    "conversation_id",
    "from_number",
    "to_number",
    "end_detail",
    "transcript",
    "timeline",
    "twilio_events",
    "metrics",
    "answered_by",
    "analysis",
)
# What a refused JSON column is written as (they are NOT NULL).
EMPTY_JSON: dict[str, Any] = {"transcript": [], "timeline": [], "twilio_events": [], "metrics": {}}
RECORD_FIELDS = (
    "stream_sid",
    "conversation_id",
    "direction",
    "status",
    "end_reason",
    "end_detail",
    "duration_s",
)
TIMES = ("started_at", "answered_at", "ended_at")


class Base(DeclarativeBase):
    pass


class CallRow(Base):
    """The `calls` table as the migrations leave it (head revision)."""

    __tablename__ = "calls"

    call_sid: Mapped[str] = mapped_column(Text, primary_key=True)
    stream_sid: Mapped[str | None] = mapped_column(Text)
    conversation_id: Mapped[str | None] = mapped_column(Text)
    direction: Mapped[str] = mapped_column(Text, default="inbound")
    from_number: Mapped[str | None] = mapped_column(Text)
    to_number: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, default="active")
    end_reason: Mapped[str | None] = mapped_column(Text)
    end_detail: Mapped[str | None] = mapped_column(Text)
    twilio_status: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    answered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    duration_s: Mapped[float | None] = mapped_column(Float)
    transcript: Mapped[list[Any]] = mapped_column(JSON, default=list)
    timeline: Mapped[list[Any]] = mapped_column(JSON, default=list)
    # Status callbacks, kept apart: they may arrive while the call's own record is written.
    twilio_events: Mapped[list[Any]] = mapped_column(JSON, default=list)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    instance: Mapped[str | None] = mapped_column(String)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=lambda: datetime.now(UTC))
    refused_fields: Mapped[str | None] = mapped_column(Text)
    answered_by: Mapped[str | None] = mapped_column(Text)  # Twilio's AnsweredBy (detection on)
    analysis: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the post-call analysis

    __table_args__ = (
        Index("ix_calls_status", "status"),
        Index("ix_calls_started_at", "started_at"),
        Index("ix_calls_end_reason", "end_reason"),
        Index("ix_calls_conversation_id", "conversation_id"),
    )


class InstanceRow(Base):
    """One running process of the fleet and its lease (`fleet.py`)."""

    __tablename__ = "instances"

    instance_id: Mapped[str] = mapped_column(Text, primary_key=True)
    run_id: Mapped[str] = mapped_column(Text)
    host: Mapped[str] = mapped_column(Text)
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    renewed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    draining: Mapped[bool] = mapped_column(Boolean, default=False)
    live_calls: Mapped[int] = mapped_column(Integer, default=0)
    reconciled_by: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_instances_expires_at", "expires_at"),)


class FleetCallRow(Base):
    """Which instance holds a call, and whether its stream token was used (`fleet.py`)."""

    __tablename__ = "fleet_calls"

    call_sid: Mapped[str] = mapped_column(Text, primary_key=True)
    instance: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(Text)  # answered | live | ended
    stream_used: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_fleet_calls_instance_state", "instance", "state"),)


CALLS = cast(Table, CallRow.__table__)
INSTANCES = cast(Table, InstanceRow.__table__)
FLEET_CALLS = cast(Table, FleetCallRow.__table__)


def aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:  # SQLite hands back naive datetimes
        return value.replace(tzinfo=UTC)
    return value


def as_time(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return aware(value)
    return aware(datetime.fromisoformat(str(value)))


def row_to_dict(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row's columns as the API and the CLI show a record."""

    def iso(value: datetime | None) -> str | None:
        value = aware(value)
        return value.isoformat() if value is not None else None

    refused = row.get("refused_fields")
    return {
        "call_sid": row["call_sid"],
        "stream_sid": row.get("stream_sid"),
        "conversation_id": row.get("conversation_id"),
        "direction": row.get("direction"),
        "from": row.get("from_number"),
        "to": row.get("to_number"),
        "status": row.get("status"),
        "end_reason": row.get("end_reason"),
        "end_detail": row.get("end_detail"),
        "twilio_status": row.get("twilio_status"),
        "twilio_events": row.get("twilio_events") or [],
        "started_at": iso(row.get("started_at")),
        "answered_at": iso(row.get("answered_at")),
        "ended_at": iso(row.get("ended_at")),
        "duration_s": row.get("duration_s"),
        "transcript": row.get("transcript") or [],
        "timeline": row.get("timeline") or [],
        "metrics": row.get("metrics") or {},
        "answered_by": row.get("answered_by"),
        "analysis": row.get("analysis"),
        "refused_fields": refused.split(",") if refused else [],
    }


# -- operations: what a write does to a row, as plain data (they are spooled as JSON) -------
