"""Call records through SQLAlchemy 2 (async): a SQLite file by default, PostgreSQL by URL.

The database is never on a call's path. Every write (a call's record at start and at
end, a Twilio status callback, an outbound call's placeholder, a record closed by
recovery) is an *operation* queued in memory and applied by one writer task, one
transaction per call, so a record the database refuses never holds up another. The
writer retries every transient error (connection refused or reset, timeouts, a
database restarting) with capped exponential backoff (tenacity), so writes are
replayed within seconds of the database coming back, not when the next call comes.

While the database is unreachable, queued operations are appended to a spool file
(JSON lines, fsync'd) at once, so a SIGTERM or SIGKILL in the middle of an outage
loses nothing: the next start (or the database's return) replays them in order, and a
call that ended during the outage keeps its true end reason and transcript. A value
the database refuses costs only its own field: the record is written without it and
names it in `refused_fields`; an operation that cannot be written at all goes to a
quarantine file with one log line, and never stops the server from starting.

The schema is versioned with Alembic (`callbridge/migrations`) and upgraded at start
under a lock (a PostgreSQL advisory lock; a file lock beside a SQLite file), so that
any number of instances starting together never race to create it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import insert, update
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_never, wait_exponential_jitter

from callbridge.config import SPOOL_FILE, redact_url
from callbridge.dberrors import DatabaseError, explain
from callbridge.logs import call_extra, log_event
from callbridge.record import CallRecord
from callbridge.store.files import QUARANTINE_NAME, append_lines, iter_spool
from callbridge.store.migrate import migrate as migrate_schema
from callbridge.store.ops import Op, apply_op, is_transient
from callbridge.store.reads import Page, Reads, StoreUnavailable, short
from callbridge.store.schema import CALLS, CORE_COLUMNS, EMPTY_JSON, OPTIONAL_COLUMNS, CallRow, row_to_dict

__all__ = [
    "CallRow",
    "CallStore",
    "Page",
    "StoreUnavailable",
    "apply_op",
    "is_transient",
    "iter_spool",
    "row_to_dict",
    "upgrade_database",
]

ListOfDicts = list[dict[str, Any]]
T = TypeVar("T")

log = logging.getLogger("callbridge.store")


def _start_error(exc: BaseException, url: str) -> DatabaseError:
    """The one-line start-up error for a database problem."""
    return exc if isinstance(exc, DatabaseError) else DatabaseError(explain(exc, url))


def _applied(row: dict[str, Any] | None, ops: list[Op]) -> dict[str, Any] | None:
    for op in ops:
        row = apply_op(row, op)
    return row


def _values(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "call_sid"}


class CallStore(Reads):
    """The records of calls. `save` (the bridge's `RecordSink`) and the other writes
    return at once; reads raise `StoreUnavailable` within `timeout` seconds when the
    database cannot answer."""

    def __init__(
        self,
        url: str,
        instance: str | None = None,
        busy_timeout: float = 5.0,
        spool_path: str | None = None,
        timeout: float = 5.0,
        connect_timeout: float = 5.0,
        max_retry_delay: float = 2.0,
    ) -> None:
        self.url = url
        self.instance = instance
        self.timeout = timeout
        self.max_retry_delay = max_retry_delay
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            # SQLite: wait this long for a lock rather than fail at once.
            kwargs["connect_args"] = {"timeout": busy_timeout}
        elif url.startswith("postgresql"):
            kwargs["connect_args"] = {
                "timeout": connect_timeout,
                "command_timeout": timeout,
                "server_settings": {"application_name": "callbridge"},
            }
            kwargs["pool_pre_ping"] = True
            kwargs["pool_timeout"] = timeout
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        self.spool_path = spool_path or os.path.abspath(SPOOL_FILE)
        self.quarantine_path = os.path.join(os.path.dirname(self.spool_path), QUARANTINE_NAME)
        self._pending: dict[str, list[Op]] = {}
        self._spooled: set[int] = set()  # ids of pending ops already in the spool file
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._writer_task: asyncio.Task[None] | None = None
        self._healthy = True
        self._slow = False  # a write pass has been running for over `spool_after` seconds
        self.spool_after = min(1.0, timeout)
        self.read_timeout = min(3.0, timeout)  # the API answers 503 within this
        self._reads: set[asyncio.Task[Any]] = set()  # reads given up on, still cleaning up
        self._down_since: float | None = None
        self._closed = False
        self.saves_failed = 0  # failed write passes (each retried)
        self.quarantined = 0
        self.unwritten = 0  # calls whose writes were left in the spool at close

    # -- life ---------------------------------------------------------------------------

    async def init(self, migrate: bool = True, read_only: bool = False, start: bool = True) -> None:
        """Upgrade the schema (under the migration lock), take back what an earlier run
        spooled, and start the writer. A database that cannot be opened raises
        `callbridge.dberrors.DatabaseError` with one line for the user. `read_only` (the
        CLI's `calls list/show`): only check that the records can be read; no migration,
        no spool, no writer. `start=False` (the server's check before it listens): migrate
        and check the spool folder only; the spool is taken back by the server itself."""
        if read_only:
            if not await self._opening(self._has_calls_table(), self.timeout):
                await self._dispose(self.timeout)
                raise _start_error(
                    LookupError(
                        "it has no call records table: `callbridge serve` or `callbridge db upgrade` makes it"
                    ),
                    self.url,
                )
            return
        if migrate:
            await self.migrate()
        self._check_spool_folder()  # after the database: a bad SQLite folder is named as such
        if not start:
            return
        self._load_spool()
        self._writer_task = asyncio.ensure_future(self._writer())
        if self._pending:
            self._kick()

    async def migrate(self) -> str:
        """Upgrade the schema under the migration lock; the revision it is at."""
        return await self._opening(migrate_schema(self.engine, self.url), self.timeout * 6)

    async def _has_calls_table(self) -> bool:
        async with self.engine.connect() as conn:
            found: bool = await conn.run_sync(lambda sync: sa_inspect(sync).has_table("calls"))
            return found

    async def _opening(self, work: Awaitable[T], timeout: float) -> T:
        """A step of opening the database, bounded; a failure releases the connections
        and becomes the one-line `DatabaseError`."""
        try:
            async with asyncio.timeout(timeout):
                return await work
        except Exception as exc:
            await self._dispose(self.timeout)
            raise _start_error(exc, self.url) from None

    async def close(self, timeout: float | None = None) -> int:
        """Write what is pending (for at most `timeout`, default the store's timeout), spool
        the rest, release the connections. Returns the number of calls left in the spool.
        Bounded by `timeout` (+0.5 s) whatever the database does."""
        if self._closed:
            return self.unwritten
        self._closed = True
        budget = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + budget

        def left(floor: float) -> float:
            return max(floor, deadline - time.monotonic())

        if self._writer_task is not None:
            if self._pending and self._healthy:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left(0.0) * 0.8):
                        await self._idle.wait()
            self._writer_task.cancel()
            # A pass cut short on a hung server finishes its clean-up on its own.
            await asyncio.wait({self._writer_task}, timeout=left(0.1) / 2)
        if self._pending:
            self._spool_pending()
            self.unwritten = len(self._pending)
            log.error(
                "store: %d call records not written to the database (%s); they are in %s "
                "and will be written at the next start",
                self.unwritten,
                redact_url(self.url),
                self.spool_path,
            )
        if self._reads:  # reads given up on, still cleaning up
            await asyncio.wait(self._reads, timeout=left(0.1) / 2)
        await self._dispose(left(0.2))
        return self.unwritten

    async def _dispose(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self.engine.dispose()
        except (TimeoutError, SQLAlchemyError, OSError) as exc:
            # A hung server never answers the goodbye: drop the connections without it.
            log.warning("store: closing database connections: %s", short(exc))
            with contextlib.suppress(Exception):
                async with asyncio.timeout(0.3):
                    await self.engine.dispose(close=False)

    @property
    def pending(self) -> int:
        """Calls with writes not yet in the database."""
        return len(self._pending)

    @property
    def healthy(self) -> bool:
        return self._healthy

    async def wait_written(self, timeout: float) -> bool:
        """Wait until every queued write is in the database (True), or `timeout` passes."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def wait_call_written(self, call_sid: str, timeout: float) -> bool:
        """Wait until the queued writes of one call are in the database (True), or `timeout`
        passes (polled: only crash recovery and the fleet wait so, before a hang-up whose
        status callback another instance may act on)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while call_sid in self._pending:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    # -- writes: queued, return at once -------------------------------------------------

    async def save(self, record: CallRecord) -> None:
        if not record.call_sid:
            return
        self._enqueue({"op": "record", "call_sid": record.call_sid, "record": record.to_dict()})

    async def set_twilio_status(
        self, call_sid: str, twilio_status: str, details: dict[str, Any], form: dict[str, str] | None = None
    ) -> None:
        """A status callback. It may come before any record of the call (an outbound
        call's `initiated`): then it starts the record from what the callback says."""
        form = {k: v for k, v in (form or {}).items() if k in ("Direction", "From", "To")}
        self._enqueue(
            {"op": "status", "call_sid": call_sid, "status": twilio_status, "details": details, "form": form}
        )

    async def create_placeholder(self, call_sid: str, direction: str, from_: str, to: str) -> dict[str, Any]:
        """An outbound call created but not yet connected: visible in the API at once.
        Returns the record as it will be written (without waiting for the database)."""
        op: Op = {"op": "placeholder", "call_sid": call_sid, "direction": direction, "from": from_, "to": to}
        self._enqueue(op)
        row = apply_op(None, op)
        assert row is not None
        return row_to_dict(row)

    async def close_record(
        self,
        call_sid: str,
        reason: str,
        detail: str,
        force: bool = False,
        direction: str | None = None,
        from_: str | None = None,
        to: str | None = None,
    ) -> None:
        """End a record left open (creating it if the call never had one); `force`
        rewrites the reason and detail of an ended one."""
        op: Op = {"op": "close", "call_sid": call_sid, "reason": reason, "detail": detail, "force": force}
        op.update({"direction": direction, "from_number": from_, "to_number": to})
        self._enqueue(op)

    async def set_answered_by(self, call_sid: str, answered_by: str) -> None:
        """Who or what answered an outbound call (answering-machine detection)."""
        self._enqueue({"op": "answered_by", "call_sid": call_sid, "answered_by": answered_by})

    async def set_analysis(self, call_sid: str, analysis: dict[str, Any]) -> None:
        """The post-call analysis of a recorded call; a record that has one keeps it."""
        self._enqueue({"op": "analysis", "call_sid": call_sid, "analysis": analysis})

    def _enqueue(self, op: Op) -> None:
        op.setdefault("at", datetime.now(UTC).isoformat())
        op.setdefault("instance", self.instance)
        ops = self._pending.setdefault(op["call_sid"], [])
        if op["op"] == "record" and ops and ops[-1]["op"] == "record" and id(ops[-1]) not in self._spooled:
            ops[-1] = op  # a newer snapshot of the same record replaces one not yet written
        else:
            ops.append(op)
        if not self._healthy or self._slow or self._writer_task is None:
            # The database is down (or the store is not running): on disk at once.
            self._spool_pending()
        self._kick()

    def _slow_pass(self) -> None:
        self._slow = True
        self._spool_pending()

    def _kick(self) -> None:
        self._idle.clear()
        self._wakeup.set()

    # -- the writer -----------------------------------------------------------------------

    async def _writer(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            try:
                async for attempt in AsyncRetrying(
                    retry=retry_if_exception(is_transient),
                    wait=wait_exponential_jitter(multiplier=0.1, max=self.max_retry_delay, jitter=0.2),
                    stop=stop_never,
                    before_sleep=self._write_failed,
                    reraise=True,
                ):
                    with attempt:
                        # A pass that takes longer than `spool_after` (a slow or hung
                        # database) puts what is queued on disk meanwhile.
                        slow = asyncio.get_running_loop().call_later(self.spool_after, self._slow_pass)
                        try:
                            await self._write_pass()
                        finally:
                            slow.cancel()
                            self._slow = False
            except Exception:  # a bug, not the database: keep the writes, try again later
                log.exception("store: writer pass failed; retrying in %.0f s", self.max_retry_delay)
                self._spool_pending()
                await asyncio.sleep(self.max_retry_delay)
                self._wakeup.set()
                continue
            if not self._pending:
                self._idle.set()
                self._remove_spool()

    async def _write_pass(self) -> None:
        while self._pending:
            for call_sid in list(self._pending):
                ops = list(self._pending.get(call_sid, ()))
                if not ops:
                    self._pending.pop(call_sid, None)
                    continue
                try:
                    await self._bounded(functools.partial(self._write_call, call_sid=call_sid, ops=ops))
                except Exception as exc:
                    if is_transient(exc):
                        raise  # the database, not this record: retry the whole pass
                    await self._write_refused(call_sid, ops, exc)
                self._done(call_sid, ops)
            if not self._healthy:
                assert self._down_since is not None
                log.warning(
                    "store: database back after %.1f s; queued call records written",
                    time.monotonic() - self._down_since,
                )
                self._healthy, self._down_since = True, None

    def _done(self, call_sid: str, ops: list[Op]) -> None:
        left = self._pending.get(call_sid, [])
        written_ids = {id(op) for op in ops}
        rest = [op for op in left if id(op) not in written_ids]
        self._spooled -= written_ids
        if rest:
            self._pending[call_sid] = rest
        else:
            self._pending.pop(call_sid, None)

    async def _write_failed(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        self.saves_failed += 1
        if self._healthy:
            self._healthy, self._down_since = False, time.monotonic()
            log.error(
                "store: database unavailable (%s): %d calls' records queued, kept in %s, retrying",
                short(exc) if exc else "?",
                len(self._pending),
                self.spool_path,
            )
        self._spool_pending()

    async def _bounded(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """`work` in one transaction, bounded by the store's timeout."""
        async with asyncio.timeout(self.timeout), self.engine.begin() as conn:
            return await work(conn)

    async def _write_call(self, conn: AsyncConnection, call_sid: str, ops: list[Op]) -> None:
        await self._merge(conn, call_sid, ops)

    async def _merge(
        self,
        conn: AsyncConnection,
        call_sid: str,
        ops: list[Op],
        shape: Callable[[dict[str, Any]], dict[str, Any]] = dict,
    ) -> dict[str, Any] | None:
        """`ops` applied to the call's row, which is written back whole (`shape` picks what
        of it); returns the row as the ops left it. The row is read locked: another
        instance's write to it (a verdict, a status callback) between this read and this
        write would otherwise be lost."""
        current = await self._read_row(conn, call_sid, lock=True)
        row = _applied(current, ops)
        if row is None:
            return None
        out = shape(row)
        if out == current:
            return row
        if current is not None:
            await self._update(conn, call_sid, out)
            return row
        try:
            async with conn.begin_nested():
                await conn.execute(insert(CALLS).values(call_sid=call_sid, **_values(out)))
        except IntegrityError:
            # Another instance inserted this call's row first (its status callback, say):
            # these writes go on top of its row.
            current = await self._read_row(conn, call_sid, lock=True)
            row = _applied(current, ops)
            assert row is not None  # the row exists now
            await self._update(conn, call_sid, shape(row))
        return row

    @staticmethod
    async def _update(conn: AsyncConnection, call_sid: str, row: dict[str, Any]) -> None:
        await conn.execute(update(CALLS).where(CALLS.c.call_sid == call_sid).values(**_values(row)))

    async def _write_refused(self, call_sid: str, ops: list[Op], exc: BaseException) -> None:
        """The database refused something in this call's row: write it field by field,
        leaving out (and naming) what it refuses; failing that, quarantine the writes."""
        refused: list[str] = []

        def core_only(row: dict[str, Any]) -> dict[str, Any]:
            base = {k: row.get(k) for k in CORE_COLUMNS}
            base.update({k: (EMPTY_JSON.get(k) if k in EMPTY_JSON else None) for k in OPTIONAL_COLUMNS})
            base["refused_fields"] = ",".join(OPTIONAL_COLUMNS)
            return {"call_sid": call_sid, **base}

        async def core(conn: AsyncConnection) -> dict[str, Any] | None:
            return await self._merge(conn, call_sid, ops, core_only)

        try:
            row = await self._bounded(core)
        except Exception as err:
            self._quarantine(call_sid, ops, err)
            return
        if row is None:
            return
        for name in OPTIONAL_COLUMNS:
            stmt = update(CALLS).where(CALLS.c.call_sid == call_sid).values({name: row.get(name)})
            try:
                await self._bounded(functools.partial(_execute, statement=stmt))
            except Exception as err:
                if is_transient(err):
                    raise  # down again: this call's writes stay queued
                refused.append(name)
        where = CALLS.c.call_sid == call_sid
        note = update(CALLS).where(where).values(refused_fields=",".join(refused) or None)
        await self._bounded(functools.partial(_execute, statement=note))
        log_event(
            log,
            "store.write_refused",
            logging.ERROR,
            call_sid=call_sid,
            error=short(exc),
            # The record is written without these; none: refused as one write, written field by field.
            refused_fields=",".join(refused) or "none",
        )

    # -- spool and quarantine ---------------------------------------------------------

    def _check_spool_folder(self) -> None:
        folder = os.path.dirname(self.spool_path)
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
            raise DatabaseError(
                f"the spool folder {folder} (where records wait while the database is down) "
                "is missing or not writable: create it or set CALLBRIDGE_SPOOL_DIR to a writable folder"
            )

    def _spool_pending(self) -> None:
        """Append every queued operation not yet on disk to the spool (fsync'd)."""
        new = [op for ops in self._pending.values() for op in ops if id(op) not in self._spooled]
        if not new:
            return
        try:
            append_lines(self.spool_path, [json.dumps(op) for op in new])
        except OSError as err:
            log.critical(
                "store: %d writes could not be spooled to %s (%r): they are only in memory",
                len(new),
                self.spool_path,
                err,
            )
            return
        self._spooled.update(id(op) for op in new)

    def _remove_spool(self) -> None:
        if self._spooled or not os.path.exists(self.spool_path):
            return
        try:
            os.remove(self.spool_path)
        except OSError as err:
            log.error("store: spooled records written; %s could not be removed: %r", self.spool_path, err)

    def _load_spool(self) -> None:
        if not os.path.exists(self.spool_path):
            return
        loaded = 0
        with open(self.spool_path, encoding="utf-8", errors="surrogateescape") as spool:
            for number, line in enumerate(spool, 1):
                if not line.strip():
                    continue
                try:
                    op = json.loads(line)
                    if not isinstance(op, dict) or not isinstance(op.get("call_sid"), str):
                        raise ValueError("not a spooled write")
                    apply_op(None, op)  # checks it can be applied at all
                except (ValueError, TypeError, KeyError, AttributeError) as exc:
                    self._quarantine_line(line, f"{self.spool_path}:{number}: {short(exc)}")
                    continue
                self._pending.setdefault(op["call_sid"], []).append(op)
                self._spooled.add(id(op))
                loaded += 1
        if loaded:
            log.warning(
                "store: %d writes of %d calls taken back from %s; writing them now",
                loaded,
                len(self._pending),
                self.spool_path,
            )
            self._idle.clear()

    def _quarantine(self, call_sid: str, ops: list[Op], exc: BaseException) -> None:
        lines = "".join(json.dumps(op) + "\n" for op in ops)
        self._quarantine_line(lines, f"call {call_sid}: the database refused it ({short(exc)})", call_sid)

    def _quarantine_line(self, lines: str, why: str, call_sid: str | None = None) -> None:
        self.quarantined += 1
        try:
            append_lines(self.quarantine_path, [line for line in lines.splitlines() if line.strip()])
            log.error("store: %s; moved to %s", why, self.quarantine_path, extra=call_extra(call_sid))
        except OSError as err:
            log.critical(
                "store: %s; and it could not be kept in %s (%r)",
                why,
                self.quarantine_path,
                err,
                extra=call_extra(call_sid),
            )


async def _execute(conn: AsyncConnection, statement: Any) -> Any:
    return await conn.execute(statement)


async def upgrade_database(url: str) -> str:
    """Apply the schema migrations (for `callbridge db upgrade`); returns the revision."""
    store = CallStore(url)
    try:
        return await store.migrate()
    finally:
        await store._dispose(store.timeout)
