"""Reading the records: bounded in time, answered from this process's queued writes
where the database cannot answer, `StoreUnavailable` otherwise (the API's 503)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Integer, cast, extract, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from callbridge.store.ops import Op, apply_op
from callbridge.store.schema import CALLS, row_to_dict

__all__ = ["Page", "Reads", "StoreUnavailable", "short"]

T = TypeVar("T")
ListOfDicts = list[dict[str, Any]]


# The columns of a list view (`list_calls(brief=True)`).
BRIEF_COLUMNS = (
    CALLS.c.call_sid,
    CALLS.c.direction,
    CALLS.c.from_number,
    CALLS.c.to_number,
    CALLS.c.status,
    CALLS.c.end_reason,
    CALLS.c.started_at,
    CALLS.c.ended_at,
    CALLS.c.duration_s,
)


BRIEF_KEYS = (
    "call_sid",
    "direction",
    "from",
    "to",
    "status",
    "end_reason",
    "started_at",
    "ended_at",
    "duration_s",
)
# How `summary` names the calls that have no end reason yet.
NOT_ENDED = "(not ended)"


def brief_dict(row: dict[str, Any]) -> dict[str, Any]:
    full = row_to_dict(row)
    return {key: full[key] for key in BRIEF_KEYS}


def _minute_bucket(dialect: str) -> ColumnElement[Any]:
    """Minutes since the epoch of `started_at`, in the database's own terms."""
    if dialect == "sqlite":
        return cast(func.strftime("%s", CALLS.c.started_at), Integer) // 60
    return cast(func.floor(extract("epoch", CALLS.c.started_at) / 60), Integer)


class StoreUnavailable(Exception):
    """A read could not be answered: the database is down, hung or refusing connections."""


@dataclass
class Page:
    items: ListOfDicts
    next_offset: int | None


def short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Reads:
    """The reading half of `CallStore` (a mixin: the store holds the state it uses)."""

    engine: AsyncEngine
    timeout: float
    read_timeout: float
    _pending: dict[str, list[Op]]
    _healthy: bool
    _writer_task: asyncio.Task[None] | None
    _reads: set[asyncio.Task[Any]]

    async def wait_written(self, timeout: float) -> bool:
        raise NotImplementedError

    @staticmethod
    async def _read_row(conn: AsyncConnection, call_sid: str, lock: bool = False) -> dict[str, Any] | None:
        """The call's row; with `lock`, locked until the transaction ends (FOR UPDATE on
        PostgreSQL; SQLite has one writer at a time and no such clause)."""
        query = select(CALLS).where(CALLS.c.call_sid == call_sid)
        result = await conn.execute(query.with_for_update() if lock else query)
        found = result.mappings().first()
        return dict(found) if found is not None else None

    async def _read(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """`work` on a connection, answered or given up within `timeout`. The read runs in
        its own task: giving up on a hung server must not wait for its connection's
        clean-up (seconds more), so that task finishes on its own, bounded, in the background."""

        async def read() -> T:
            async with asyncio.timeout(self.timeout * 2), self.engine.connect() as conn:
                return await work(conn)

        task = asyncio.ensure_future(read())
        try:
            done, _ = await asyncio.wait({task}, timeout=self.read_timeout)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not done:
            task.cancel()
            self._reads.add(task)
            task.add_done_callback(self._read_done)
            raise StoreUnavailable("the call records database did not answer in time")
        try:
            return task.result()
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"the call records database is unavailable: {short(exc, 200)}") from None

    async def _settle(self) -> None:
        """Read-your-writes for lists: with a healthy database, the writes this process
        queued a moment ago (milliseconds) are in before the query runs."""
        if self._pending and self._healthy and self._writer_task is not None:
            await self.wait_written(min(1.0, self.read_timeout))

    def _read_done(self, task: asyncio.Task[Any]) -> None:
        self._reads.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: it was given up on and reported already

    async def get(self, call_sid: str) -> dict[str, Any] | None:
        """One record, with this process's writes not yet in the database applied."""
        ops = list(self._pending.get(call_sid, ()))
        try:
            row = await self._read(lambda conn: self._read_row(conn, call_sid))
        except StoreUnavailable:
            if not ops:
                raise
            row = None
        for op in ops:
            row = apply_op(row, op)
        return row_to_dict(row) if row is not None else None

    async def find_by_conversation(self, conversation_id: str) -> dict[str, Any] | None:
        """The record of the call whose agent conversation is `conversation_id`, or None."""
        for sid, ops in list(self._pending.items()):  # queued here, maybe not written yet
            if any((op.get("record") or {}).get("conversation_id") == conversation_id for op in ops):
                return await self.get(sid)
        query = select(CALLS.c.call_sid).where(CALLS.c.conversation_id == conversation_id).limit(1)

        async def work(conn: AsyncConnection) -> str | None:
            found = (await conn.execute(query)).scalars().first()
            return str(found) if found is not None else None

        found: str | None = await self._read(work)
        return await self.get(found) if found is not None else None

    async def list_calls(
        self,
        status: str | None = None,
        end_reason: str | None = None,
        since: datetime | None = None,
        limit: int = 50,
        offset: int = 0,
        until: datetime | None = None,
        brief: bool = False,
    ) -> Page:
        """A page of records, newest first. `brief`: the list's columns only (no transcript,
        timeline, events or metrics), for a list view over thousands of records."""
        query = select(*BRIEF_COLUMNS) if brief else select(CALLS)
        if status:
            query = query.where(CALLS.c.status == status)
        if end_reason:
            query = query.where(CALLS.c.end_reason == end_reason)
        if since:
            query = query.where(CALLS.c.started_at >= since)
        if until:
            query = query.where(CALLS.c.started_at < until)
        query = query.order_by(CALLS.c.started_at.desc(), CALLS.c.call_sid).offset(offset).limit(limit + 1)

        async def work(conn: AsyncConnection) -> list[dict[str, Any]]:
            return [dict(r) for r in (await conn.execute(query)).mappings().all()]

        await self._settle()
        rows = await self._read(work)
        more = len(rows) > limit
        shown = brief_dict if brief else row_to_dict
        return Page([shown(r) for r in rows[:limit]], offset + limit if more else None)

    async def summary(self, since: datetime) -> dict[str, Any]:
        """Calls started per minute and end reasons since `since`, counted by the database
        (GROUP BY on the indexed started_at), never by loading rows."""
        recent = CALLS.c.started_at >= since
        minute = _minute_bucket(self.engine.dialect.name)
        per_minute = select(minute, func.count()).where(recent).group_by(minute).order_by(minute)
        reasons = select(CALLS.c.end_reason, func.count()).where(recent).group_by(CALLS.c.end_reason)

        async def work(conn: AsyncConnection) -> dict[str, Any]:
            minutes = [(int(m), int(n)) for m, n in (await conn.execute(per_minute)).all() if m is not None]
            rows = (await conn.execute(reasons)).all()
            ends = {str(r) if r is not None else NOT_ENDED: int(n) for r, n in rows}
            return {"per_minute": minutes, "end_reasons": ends}

        await self._settle()
        counted = await self._read(work)
        return {
            "since": since.isoformat(),
            "per_minute": [
                {"minute": datetime.fromtimestamp(m * 60, UTC).isoformat(), "calls": n}
                for m, n in counted["per_minute"]
            ],
            "end_reasons": counted["end_reasons"],
        }

    async def count_by_end_reason(self) -> dict[str, int]:
        query = select(CALLS.c.end_reason, func.count()).group_by(CALLS.c.end_reason)

        async def work(conn: AsyncConnection) -> dict[str, int]:
            return {str(reason): int(n) for reason, n in (await conn.execute(query)).all()}

        await self._settle()
        return await self._read(work)

    async def active_call_sids(self, instance: str | None = None) -> list[str]:
        """Calls recorded as live (by one instance, if given)."""
        query = select(CALLS.c.call_sid).where(CALLS.c.status == "active")
        if instance is not None:
            query = query.where(CALLS.c.instance == instance)

        async def work(conn: AsyncConnection) -> list[str]:
            return [str(sid) for sid in (await conn.execute(query)).scalars().all()]

        sids = await self._read(work)
        # A close queued here but not yet written is as good as written.
        return [s for s in sids if not any(op["op"] == "close" for op in self._pending.get(s, ()))]
