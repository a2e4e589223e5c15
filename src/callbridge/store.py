"""Call records through SQLAlchemy 2 (async): a SQLite file by default, PostgreSQL by URL.

`CallStore.save` is the `RecordSink` of the bridge: called when a call starts and
when it ends (an upsert by call SID). A record is never dropped because the
database hiccupped at the moment the call ended: a failed save is kept in memory
and retried with backoff (and with every later save); if the database is still
unwritable at `close()`, the records go to a spool file (JSON lines) that the next
`init()` writes to the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import JSON, DateTime, Float, Index, String, Text, func, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from callbridge.call import CallRecord

__all__ = ["CallRow", "CallStore", "Page"]

ListOfDicts = list[dict[str, Any]]
T = TypeVar("T")

# CallRecord fields stored as they are (same name on the row).
_COPIED_FIELDS = (
    "stream_sid",
    "conversation_id",
    "direction",
    "from_number",
    "to_number",
    "status",
    "end_reason",
    "end_detail",
    "started_at",
    "answered_at",
    "ended_at",
    "duration_s",
)

log = logging.getLogger("callbridge.store")


class Base(DeclarativeBase):
    pass


class CallRow(Base):
    __tablename__ = "calls"

    call_sid: Mapped[str] = mapped_column(String(64), primary_key=True)
    stream_sid: Mapped[str | None] = mapped_column(String(64))
    conversation_id: Mapped[str | None] = mapped_column(String(128))
    direction: Mapped[str] = mapped_column(String(16), default="inbound")
    from_number: Mapped[str | None] = mapped_column(String(64))
    to_number: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="active")
    end_reason: Mapped[str | None] = mapped_column(String(32))
    end_detail: Mapped[str | None] = mapped_column(Text)
    twilio_status: Mapped[str | None] = mapped_column(String(32))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    answered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    duration_s: Mapped[float | None] = mapped_column(Float)
    transcript: Mapped[list[Any]] = mapped_column(JSON, default=list)
    timeline: Mapped[list[Any]] = mapped_column(JSON, default=list)
    # Status callbacks, kept apart: they may arrive while the call's own record is written.
    twilio_events: Mapped[list[Any]] = mapped_column(JSON, default=list)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    instance: Mapped[str | None] = mapped_column(String(128))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=lambda: datetime.now(UTC))

    __table_args__ = (
        Index("ix_calls_status", "status"),
        Index("ix_calls_started_at", "started_at"),
        Index("ix_calls_end_reason", "end_reason"),
    )

    def to_dict(self) -> dict[str, Any]:
        def iso(value: datetime | None) -> str | None:
            if value is None:
                return None
            if value.tzinfo is None:  # SQLite hands back naive datetimes
                value = value.replace(tzinfo=UTC)
            return value.isoformat()

        return {
            "call_sid": self.call_sid,
            "stream_sid": self.stream_sid,
            "conversation_id": self.conversation_id,
            "direction": self.direction,
            "from": self.from_number,
            "to": self.to_number,
            "status": self.status,
            "end_reason": self.end_reason,
            "end_detail": self.end_detail,
            "twilio_status": self.twilio_status,
            "twilio_events": self.twilio_events or [],
            "started_at": iso(self.started_at),
            "answered_at": iso(self.answered_at),
            "ended_at": iso(self.ended_at),
            "duration_s": self.duration_s,
            "transcript": self.transcript or [],
            "timeline": self.timeline or [],
            "metrics": self.metrics or {},
        }


@dataclass
class Page:
    items: ListOfDicts
    next_offset: int | None


class CallStore:
    def __init__(
        self,
        url: str,
        instance: str | None = None,
        busy_timeout: float = 5.0,
        spool_path: str | None = None,
    ) -> None:
        self.url = url
        self.instance = instance
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            # SQLite: wait this long for a lock rather than fail at once.
            kwargs["connect_args"] = {"timeout": busy_timeout}
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        self._session = async_sessionmaker(self.engine, expire_on_commit=False)
        self._pending: dict[str, CallRecord] = {}
        self._lock = asyncio.Lock()
        self.spool_path = spool_path or os.path.abspath("callbridge-unsaved-records.jsonl")
        self._retry_handle: asyncio.TimerHandle | None = None
        self._retry_task: asyncio.Task[None] | None = None
        self._retry_delay = 0.5
        self.saves_failed = 0

    async def init(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        await self._load_spool()

    async def close(self) -> None:
        if self._retry_handle is not None:
            self._retry_handle.cancel()
        if self._retry_task is not None:
            self._retry_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry_task
        if self._pending:
            try:
                await self._flush()
            except SQLAlchemyError as exc:
                self._spool(exc)
        await self.engine.dispose()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def save(self, record: CallRecord) -> None:
        if not record.call_sid:
            return
        self._pending[record.call_sid] = record
        try:
            await self._flush()
        except SQLAlchemyError as exc:
            self.saves_failed += 1
            log.error(
                "store: saving call %s failed (%r); kept in memory, retrying (%d pending)",
                record.call_sid,
                exc,
                len(self._pending),
            )
            self._schedule_retry()
            raise

    async def _flush(self) -> None:
        async with self._lock:
            if not self._pending:
                return
            batch = list(self._pending.values())
            await self._write(batch)
            for record in batch:
                if self._pending.get(record.call_sid or "") is record:
                    del self._pending[record.call_sid or ""]
            self._retry_delay = 0.5

    def _schedule_retry(self) -> None:
        if self._retry_handle is not None or (self._retry_task is not None and not self._retry_task.done()):
            return
        delay, self._retry_delay = self._retry_delay, min(self._retry_delay * 2, 30.0)
        self._retry_handle = asyncio.get_running_loop().call_later(delay, self._start_retry)

    def _start_retry(self) -> None:
        self._retry_handle = None
        self._retry_task = asyncio.ensure_future(self._retry())

    async def _retry(self) -> None:
        try:
            await self._flush()
            log.info("store: pending call records written")
        except SQLAlchemyError as exc:
            log.warning("store: retry failed (%r); %d records still pending", exc, len(self._pending))
            self._retry_task = None
            self._schedule_retry()

    def _spool(self, exc: BaseException) -> None:
        """Last resort at close: the records go to a file the next start writes back."""
        try:
            with open(self.spool_path, "a", encoding="utf-8") as spool:
                for record in self._pending.values():
                    spool.write(json.dumps(record.to_dict()) + "\n")
            log.error(
                "store: database unwritable at close (%r): %d call records spooled to %s",
                exc,
                len(self._pending),
                self.spool_path,
            )
            self._pending.clear()
        except OSError as err:
            log.critical("store: %d call records could not be saved anywhere: %r", len(self._pending), err)

    def _read_spool(self) -> list[str]:
        # Once, at start, and small: no need to leave the event loop for it.
        if not os.path.exists(self.spool_path):
            return []
        with open(self.spool_path, encoding="utf-8") as spool:
            return [line for line in spool if line.strip()]

    async def _load_spool(self) -> None:
        lines = self._read_spool()
        if not lines:
            return
        for line in lines:
            try:
                record = CallRecord.from_dict(json.loads(line))
            except (ValueError, TypeError, KeyError) as exc:
                log.error("store: unreadable spooled record skipped: %r", exc)
                continue
            if record.call_sid:
                self._pending[record.call_sid] = record
        await self._flush()
        os.remove(self.spool_path)
        log.info("store: %d spooled call records written from %s", len(lines), self.spool_path)

    async def _transaction(self, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """Run `work` in a transaction. Writers of one call (its own saves, status callbacks,
        an outbound placeholder) all get-or-create its row and may race to insert it: the
        loser of the race runs again, and then finds the row and updates it."""
        for attempt in (1, 2):
            try:
                async with self._session() as session, session.begin():
                    return await work(session)
            except IntegrityError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _write(self, records: list[CallRecord]) -> None:
        await self._transaction(lambda session: self._write_rows(session, records))

    async def _write_rows(self, session: AsyncSession, records: list[CallRecord]) -> None:
        for record in records:
            row = await session.get(CallRow, record.call_sid)
            if row is None:
                row = CallRow(call_sid=record.call_sid)
                session.add(row)
            for name in _COPIED_FIELDS:
                setattr(row, name, getattr(record, name))
            row.transcript = list(record.transcript)
            row.timeline = list(record.timeline)
            row.metrics = dict(record.metrics)
            row.instance = self.instance
            row.updated_at = datetime.now(UTC)

    async def get(self, call_sid: str) -> dict[str, Any] | None:
        async with self._session() as session:
            row = await session.get(CallRow, call_sid)
            return row.to_dict() if row else None

    async def list_calls(
        self,
        status: str | None = None,
        end_reason: str | None = None,
        since: datetime | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> Page:
        query = select(CallRow)
        if status:
            query = query.where(CallRow.status == status)
        if end_reason:
            query = query.where(CallRow.end_reason == end_reason)
        if since:
            query = query.where(CallRow.started_at >= since)
        query = query.order_by(CallRow.started_at.desc(), CallRow.call_sid).offset(offset).limit(limit + 1)
        async with self._session() as session:
            rows = list((await session.scalars(query)).all())
        more = len(rows) > limit
        return Page([r.to_dict() for r in rows[:limit]], offset + limit if more else None)

    async def count_by_end_reason(self) -> dict[str, int]:
        query = select(CallRow.end_reason, func.count()).group_by(CallRow.end_reason)
        async with self._session() as session:
            return {str(reason): int(n) for reason, n in (await session.execute(query)).all()}

    async def set_twilio_status(
        self, call_sid: str, twilio_status: str, details: dict[str, Any], form: dict[str, str] | None = None
    ) -> None:
        """Store a status callback. It may come before any record of the call (an outbound
        call's `initiated`): then it starts the record from what the callback says."""
        form = form or {}

        async def work(session: AsyncSession) -> None:
            row = await session.get(CallRow, call_sid)
            if row is None:
                direction = "outbound" if form.get("Direction", "").startswith("outbound") else "inbound"
                row = CallRow(
                    call_sid=call_sid,
                    direction=direction,
                    from_number=form.get("From"),
                    to_number=form.get("To"),
                    status="active",
                    started_at=datetime.now(UTC),
                    transcript=[],
                    timeline=[],
                    metrics={},
                    twilio_events=[],
                    instance=self.instance,
                )
                session.add(row)
            row.twilio_status = twilio_status
            row.twilio_events = [*(row.twilio_events or []), {"status": twilio_status, **details}]
            row.updated_at = datetime.now(UTC)

        await self._transaction(work)

    async def create_placeholder(self, call_sid: str, direction: str, from_: str, to: str) -> None:
        """An outbound call created but not yet connected: visible in the API at once."""

        async def work(session: AsyncSession) -> None:
            if await session.get(CallRow, call_sid) is None:
                session.add(
                    CallRow(
                        call_sid=call_sid,
                        direction=direction,
                        from_number=from_,
                        to_number=to,
                        status="active",
                        started_at=datetime.now(UTC),
                        transcript=[],
                        timeline=[],
                        metrics={},
                        instance=self.instance,
                    )
                )

        await self._transaction(work)

    async def active_call_sids(self, instance: str | None = None) -> list[str]:
        """Calls recorded as live (by one instance, if given)."""
        query = select(CallRow.call_sid).where(CallRow.status == "active")
        if instance is not None:
            query = query.where(CallRow.instance == instance)
        async with self._session() as session:
            return list((await session.scalars(query)).all())

    async def close_record(self, call_sid: str, reason: str, detail: str, force: bool = False) -> None:
        """End a record left open; `force` rewrites the reason and detail of an ended one."""
        async with self._session() as session, session.begin():
            row = await session.get(CallRow, call_sid)
            if row is None or (row.status == "ended" and not force):
                return
            row.status = "ended"
            row.end_reason = reason
            row.end_detail = detail
            row.ended_at = datetime.now(UTC)
            if row.started_at is not None:
                started = row.started_at if row.started_at.tzinfo else row.started_at.replace(tzinfo=UTC)
                row.duration_s = round((row.ended_at - started).total_seconds(), 3)
            row.updated_at = datetime.now(UTC)
