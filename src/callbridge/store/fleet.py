"""The fleet's two tables: instance leases (`instances`) and who holds each call
(`fleet_calls`). SQL only; what the fleet does with them is `server/fleet.py`.

Times come from the database's clock on PostgreSQL (`now()`), so that instances on
hosts whose clocks disagree still agree on whose lease has expired; SQLite is one
process on one host and uses this process's clock.

Every statement is bounded by `timeout` (asyncio) on top of the engine's own timeouts;
errors propagate (the caller decides: the heartbeat retries, a call's set-up fails open).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from callbridge.store.schema import CALLS, FLEET_CALLS, INSTANCES, aware

__all__ = ["FleetTables", "Lease"]

T = TypeVar("T")
_CAP_LOCK_KEY = 0x63617073  # pg_advisory_xact_lock key of the fleet-wide cap ("caps")
# A call answered with stream TwiML counts against the fleet cap this long before its
# stream connects (as `StreamTokens.RESERVED_S` does per instance).
ANSWERED_COUNTS_S = 30.0


@dataclass(frozen=True)
class Lease:
    instance_id: str
    run_id: str
    host: str
    pid: int
    started_at: datetime
    renewed_at: datetime
    expires_at: datetime
    draining: bool
    live_calls: int
    reconciled_by: str | None

    @classmethod
    def of(cls, row: Any) -> Lease:
        m = row._mapping
        return cls(
            instance_id=m["instance_id"],
            run_id=m["run_id"],
            host=m["host"],
            pid=int(m["pid"]),
            started_at=_aware(m["started_at"]),
            renewed_at=_aware(m["renewed_at"]),
            expires_at=_aware(m["expires_at"]),
            draining=bool(m["draining"]),
            live_calls=int(m["live_calls"]),
            reconciled_by=m["reconciled_by"],
        )


def _aware(value: datetime) -> datetime:
    out = aware(value)
    assert out is not None
    return out


class FleetTables:
    def __init__(self, engine: AsyncEngine, timeout: float = 5.0) -> None:
        self.engine = engine
        self.timeout = timeout
        self.postgres = engine.dialect.name == "postgresql"

    async def _tx(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        async with asyncio.timeout(self.timeout), self.engine.begin() as conn:
            return await work(conn)

    async def _now(self, conn: AsyncConnection) -> datetime:
        if self.postgres:
            return _aware((await conn.execute(select(func.now()))).scalar_one())
        return datetime.now(UTC)

    def _insert(self, table: Any) -> Any:
        return (postgresql.insert if self.postgres else sqlite.insert)(table)

    async def now(self) -> datetime:
        return await self._tx(self._now)

    # -- leases -----------------------------------------------------------------------

    async def leases(self) -> tuple[datetime, list[Lease]]:
        """The database's time and every lease row."""

        async def work(conn: AsyncConnection) -> tuple[datetime, list[Lease]]:
            now = await self._now(conn)
            rows = (await conn.execute(select(INSTANCES))).all()
            return now, [Lease.of(r) for r in rows]

        return await self._tx(work)

    async def register(
        self,
        instance_id: str,
        run_id: str,
        host: str,
        pid: int,
        lease_s: float,
        reconciled_by: str | None = None,
    ) -> Lease | None:
        """Take the lease row of `instance_id` if nobody has it; else the row that holds it.
        (`reconciled_by`: a row made only to claim the open calls of an instance with none.)"""

        async def work(conn: AsyncConnection) -> Lease | None:
            now = await self._now(conn)
            values = {
                "instance_id": instance_id,
                "run_id": run_id,
                "host": host,
                "pid": pid,
                "started_at": now,
                "renewed_at": now,
                "expires_at": now + timedelta(seconds=lease_s),
                "draining": False,
                "live_calls": 0,
                "reconciled_by": reconciled_by,
            }
            stmt = (
                self._insert(INSTANCES)
                .values(**values)
                .on_conflict_do_nothing(index_elements=["instance_id"])
            )
            if (await conn.execute(stmt)).rowcount == 1:
                return None
            row = (
                await conn.execute(select(INSTANCES).where(INSTANCES.c.instance_id == instance_id))
            ).first()
            return Lease.of(row) if row is not None else None

        return await self._tx(work)

    async def take_over(
        self, instance_id: str, old_run_id: str, run_id: str, host: str, pid: int, lease_s: float
    ) -> bool:
        """Replace a row this process claimed (its own id's previous run) with its new run."""

        async def work(conn: AsyncConnection) -> bool:
            now = await self._now(conn)
            stmt = (
                update(INSTANCES)
                .where(INSTANCES.c.instance_id == instance_id, INSTANCES.c.run_id == old_run_id)
                .values(
                    run_id=run_id,
                    host=host,
                    pid=pid,
                    started_at=now,
                    renewed_at=now,
                    expires_at=now + timedelta(seconds=lease_s),
                    draining=False,
                    live_calls=0,
                    reconciled_by=None,
                )
            )
            return bool((await conn.execute(stmt)).rowcount == 1)

        return await self._tx(work)

    async def renew(
        self, instance_id: str, run_id: str, lease_s: float, live_calls: int, draining: bool
    ) -> bool:
        """Extend this run's lease; False if it is no longer ours (another instance took it)."""

        async def work(conn: AsyncConnection) -> bool:
            now = await self._now(conn)
            stmt = (
                update(INSTANCES)
                .where(
                    INSTANCES.c.instance_id == instance_id,
                    INSTANCES.c.run_id == run_id,
                    INSTANCES.c.reconciled_by.is_(None),
                )
                .values(
                    renewed_at=now,
                    expires_at=now + timedelta(seconds=lease_s),
                    live_calls=live_calls,
                    draining=draining,
                )
            )
            return bool((await conn.execute(stmt)).rowcount == 1)

        return await self._tx(work)

    async def claim(self, lease: Lease, claimer: str, expired_only: bool = True) -> datetime | None:
        """Become the one instance that reconciles `lease`'s run: the database's time of the
        claim (calls it holds started before then), or None if it was renewed, released or
        claimed by another instance first. `expired_only=False`: the caller knows the run is
        dead (its process is gone from this very host)."""

        async def work(conn: AsyncConnection) -> datetime | None:
            now = await self._now(conn)
            seen = lease.reconciled_by  # None, or a claimer that died before it finished
            conditions = [
                INSTANCES.c.instance_id == lease.instance_id,
                INSTANCES.c.run_id == lease.run_id,
                INSTANCES.c.reconciled_by.is_(None) if seen is None else INSTANCES.c.reconciled_by == seen,
            ]
            if expired_only:
                conditions.append(INSTANCES.c.expires_at < now)
            else:  # not renewed since it was seen
                conditions.append(INSTANCES.c.renewed_at == lease.renewed_at)
            stmt = update(INSTANCES).where(*conditions).values(reconciled_by=claimer)
            return now if (await conn.execute(stmt)).rowcount == 1 else None

        return await self._tx(work)

    async def release(self, instance_id: str, run_id: str) -> None:
        """Remove a run's lease row (its calls are all ended or reconciled)."""

        async def work(conn: AsyncConnection) -> None:
            stmt = delete(INSTANCES).where(
                INSTANCES.c.instance_id == instance_id, INSTANCES.c.run_id == run_id
            )
            await conn.execute(stmt)

        await self._tx(work)

    # -- calls -------------------------------------------------------------------------

    async def held_by(self, instance: str, before: datetime) -> list[str]:
        """Calls `instance` held, started before `before`, not ended: from `fleet_calls` and
        from the records (a call's record is written a little after its stream starts)."""

        async def work(conn: AsyncConnection) -> list[str]:
            sids: list[str] = []
            if self.postgres:
                q1 = select(FLEET_CALLS.c.call_sid).where(
                    FLEET_CALLS.c.instance == instance,
                    FLEET_CALLS.c.state != "ended",
                    FLEET_CALLS.c.created_at < before,
                )
                sids.extend(str(s) for s in (await conn.execute(q1)).scalars().all())
            q2 = select(CALLS.c.call_sid, CALLS.c.started_at).where(
                CALLS.c.instance == instance, CALLS.c.status == "active"
            )
            for sid, started in (await conn.execute(q2)).all():
                started = aware(started)
                if (started is None or started < before) and sid not in sids:
                    sids.append(str(sid))
            return sids

        return await self._tx(work)

    async def orphaned(self, live_instances: set[str], before: datetime) -> dict[str, list[str]]:
        """Active records whose instance holds no lease row at all (written by a release
        before leases, or whose lease row was removed), started before `before`."""

        async def work(conn: AsyncConnection) -> dict[str, list[str]]:
            q = select(CALLS.c.call_sid, CALLS.c.instance, CALLS.c.started_at).where(
                CALLS.c.status == "active"
            )
            out: dict[str, list[str]] = {}
            for sid, instance, started in (await conn.execute(q)).all():
                started = aware(started)
                if instance in live_instances or (started is not None and started >= before):
                    continue
                out.setdefault(str(instance), []).append(str(sid))
            return out

        return await self._tx(work)

    async def answered(self, call_sid: str, instance: str, cap: int | None) -> bool:
        """`instance` answers `call_sid` with stream TwiML: hold it in `fleet_calls`, counted
        against the fleet-wide `cap` (False: the fleet is full; nothing was written)."""

        async def work(conn: AsyncConnection) -> bool:
            now = await self._now(conn)
            if cap is not None:
                # One answer at a time across the fleet, for this transaction only.
                await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _CAP_LOCK_KEY})
                if await self._live_count(conn, now) >= cap:
                    return False
            stmt = (
                self._insert(FLEET_CALLS)
                .values(
                    call_sid=call_sid,
                    instance=instance,
                    state="answered",
                    stream_used=False,
                    created_at=now,
                    updated_at=now,
                )
                .on_conflict_do_nothing(index_elements=["call_sid"])
            )
            await conn.execute(stmt)
            return True

        return await self._tx(work)

    async def room(self, cap: int) -> bool:
        """Whether the fleet holds fewer than `cap` calls (an outbound call about to be placed)."""

        async def work(conn: AsyncConnection) -> bool:
            return await self._live_count(conn, await self._now(conn)) < cap

        return await self._tx(work)

    async def _live_count(self, conn: AsyncConnection, now: datetime) -> int:
        """Calls held by live instances: streams running, and calls answered in the last
        `ANSWERED_COUNTS_S` whose stream has not connected yet."""
        live = (
            select(func.count())
            .select_from(FLEET_CALLS.join(INSTANCES, FLEET_CALLS.c.instance == INSTANCES.c.instance_id))
            .where(
                FLEET_CALLS.c.state != "ended",
                INSTANCES.c.expires_at > now,
                INSTANCES.c.reconciled_by.is_(None),
                (FLEET_CALLS.c.state == "live")
                | (FLEET_CALLS.c.created_at > now - timedelta(seconds=ANSWERED_COUNTS_S)),
            )
        )
        return int((await conn.execute(live)).scalar_one())

    async def stream_started(self, call_sid: str, instance: str) -> bool:
        """The stream of `call_sid` passed its token check on `instance`: take the call.
        False if its stream was taken before (a replayed token, on any instance)."""

        async def work(conn: AsyncConnection) -> bool:
            now = await self._now(conn)
            stmt = self._insert(FLEET_CALLS).values(
                call_sid=call_sid,
                instance=instance,
                state="live",
                stream_used=True,
                created_at=now,
                updated_at=now,
            )
            stmt = stmt.on_conflict_do_update(
                index_elements=["call_sid"],
                set_={"instance": instance, "state": "live", "stream_used": True, "updated_at": now},
                where=FLEET_CALLS.c.stream_used.is_(False),
            ).returning(FLEET_CALLS.c.call_sid)
            return (await conn.execute(stmt)).first() is not None

        return await self._tx(work)

    async def stream_taken(self, call_sid: str) -> bool:
        """Whether a stream of `call_sid` passed its token check on some instance."""

        async def work(conn: AsyncConnection) -> bool:
            q = select(FLEET_CALLS.c.stream_used).where(FLEET_CALLS.c.call_sid == call_sid)
            return bool((await conn.execute(q)).scalar())

        return await self._tx(work)

    async def ended(self, call_sids: list[str]) -> None:
        async def work(conn: AsyncConnection) -> None:
            now = await self._now(conn)
            stmt = (
                update(FLEET_CALLS)
                .where(FLEET_CALLS.c.call_sid.in_(call_sids))
                .values(state="ended", updated_at=now)
            )
            await conn.execute(stmt)

        if call_sids:
            await self._tx(work)

    async def owner(self, call_sid: str) -> tuple[str, bool] | None:
        """The instance holding `call_sid` (its stream, or its answer) and whether its lease
        is live; None when no instance holds it."""

        async def work(conn: AsyncConnection) -> tuple[str, bool] | None:
            now = await self._now(conn)
            q = (
                select(FLEET_CALLS.c.instance, INSTANCES.c.expires_at, INSTANCES.c.reconciled_by)
                .select_from(
                    FLEET_CALLS.outerjoin(INSTANCES, FLEET_CALLS.c.instance == INSTANCES.c.instance_id)
                )
                .where(FLEET_CALLS.c.call_sid == call_sid, FLEET_CALLS.c.state != "ended")
            )
            row = (await conn.execute(q)).first()
            if row is None:
                return None
            instance, expires, reconciled_by = row
            live = expires is not None and _aware(expires) > now and reconciled_by is None
            return str(instance), live

        return await self._tx(work)

    async def prune(self, older_than_s: float) -> None:
        """Forget ended calls (kept a while: a late replayed token is still refused)."""

        async def work(conn: AsyncConnection) -> None:
            now = await self._now(conn)
            cutoff = now - timedelta(seconds=older_than_s)
            await conn.execute(
                delete(FLEET_CALLS).where(FLEET_CALLS.c.state == "ended", FLEET_CALLS.c.updated_at < cutoff)
            )

        await self._tx(work)
