"""One process among many on one database: its lease, the calls of dead instances, and
commands delivered to the instance that holds a call.

- **Identity.** Every process is an instance with its own id (`host-pid-xxxx` unless the
  operator names it) and a lease row in `instances`, renewed every sixth of
  `CALLBRIDGE_INSTANCE_LEASE_SECONDS` (L) and expiring 2L/3 after its last renewal, so
  that a dead instance is found within L. A clean stop removes the row.
- **Dead instances.** On each heartbeat an instance looks for runs whose lease expired
  (or whose process is gone from this very host: a crashed worker, this instance's own
  previous run) and *claims* each with one conditional UPDATE, so exactly one live
  instance reconciles it: every call the dead run held (in `fleet_calls`, or active in
  the records) that is not held by a live instance now is checked with the carrier, its
  record closed `instance_lost`, and hung up if still up (`recovery.reconcile`).
- **Ownership.** `fleet_calls` says which instance holds a call: the one that answered
  it until its stream connects, then the one running its stream (PostgreSQL only).
- **Commands** (`hangup`, carrier `status`) that reach an instance not holding the call
  are sent to the holder over PostgreSQL `LISTEN/NOTIFY`, which ends the call through
  its own lifecycle (so the record says `hangup_requested`, `caller_hung_up`, ...). A
  hang-up falls back to the carrier's REST API only when the holder is gone or silent.
- **Fleet rules.** A stream token is used once across the fleet (`stream_started`), and
  `CALLBRIDGE_FLEET_MAX_CONCURRENT_CALLS` caps the live calls of all instances together.
  If the database cannot answer in time these checks fail open (the per-process checks
  still hold) and say so in the log: a call is never refused because of an outage.

SQLite is one process: the file is locked for the life of the server (a second process
on the same file, or `--workers` over 1, is refused at start), leases still let a restart
close its previous run's calls, and there are no commands or `fleet_calls`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from callbridge.bridge import Bridge
from callbridge.call import EndReason
from callbridge.logs import log_event
from callbridge.recovery import reconcile
from callbridge.store import CallStore
from callbridge.store.fleet import FleetTables, Lease
from callbridge.telephony.base import CallControl

__all__ = ["CHANNEL", "Fleet", "FleetError", "host_key", "join", "sqlite_lock"]

log = logging.getLogger("callbridge.fleet")

CHANNEL = "callbridge_fleet"
REPLY_TIMEOUT_S = 3.0  # how long a non-holder waits for the holder to answer a hang-up
SETUP_TIMEOUT_S = 1.0  # fleet checks on a call's set-up path: fail open after this
ENDED_KEPT_S = 6 * 3600.0  # ended calls kept in fleet_calls (a replayed token is still refused)


class FleetError(Exception):
    """This process cannot join the fleet (one line for the user)."""


def host_key() -> str:
    """This host and PID namespace: two leases with the same key can check each other's PID."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = "?"
    return f"{socket.gethostname()}/{namespace}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sqlite_path(url: str) -> str | None:
    path = url.split(":///", 1)[1] if ":///" in url else ""
    if not path or path == ":memory:" or path.startswith("file:"):
        return None
    return os.path.abspath(path.split("?", 1)[0])


def sqlite_lock(url: str) -> int | None:
    """Lock a SQLite file for this process (`<file>.instance-lock`, flock): the open file
    descriptor that holds it, None for no file (in memory), `FleetError` if another
    process holds it."""
    path = _sqlite_path(url) if url.startswith("sqlite") else None
    if path is None:
        return None
    try:
        fd = os.open(path + ".instance-lock", os.O_CREAT | os.O_RDWR, 0o600)
    except OSError:
        return None  # the folder is checked, with a clear line, by the store itself
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise FleetError(
                f"the SQLite database {path} is already served by another callbridge process: "
                "SQLite is for one process; several instances or --workers need PostgreSQL "
                "(CALLBRIDGE_DATABASE_URL=postgresql+asyncpg://user:password@host/db)"
            ) from None
        raise
    return fd


Handler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


class Fleet:
    def __init__(
        self,
        instance_id: str,
        store: CallStore,
        bridge: Bridge,
        control: CallControl,
        lease_seconds: float = 30.0,
        fleet_cap: int | None = None,
    ) -> None:
        self.instance_id = instance_id
        self.run_id = uuid.uuid4().hex
        self.host = host_key()
        self.pid = os.getpid()
        self.store = store
        self.bridge = bridge
        self.control = control
        self.lease_s = lease_seconds
        # Timing, so that a dead instance is found within one lease period L: a lease is
        # renewed every L/6 and expires 2L/3 after its last renewal (three missed heartbeats
        # are tolerated); a survivor's next heartbeat after the expiry finds it: at most
        # 2L/3 + L/6 = 5L/6 after the death.
        self.heartbeat_s = lease_seconds / 6
        self.expiry_s = lease_seconds * 2 / 3
        self.fleet_cap = fleet_cap
        self.tables = FleetTables(store.engine, timeout=min(store.timeout, max(lease_seconds / 3, 0.5)))
        self.postgres = self.tables.postgres
        self.lease_ok = False  # the lease is held and was renewed within the lease period
        self.reconciled_runs = 0  # dead runs this instance reconciled
        self.commands_sent = 0
        self.commands_received = 0
        self._renewed = 0.0  # monotonic time of the last renewal
        # Since when every renewal has succeeded (None: the last one failed). Another
        # instance's expired lease is only trusted after a whole lease period of this: after a
        # database outage every lease has expired, and the others need one heartbeat to renew.
        self._healthy_since: float | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        self._listener: Any = None  # asyncpg connection LISTENing on CHANNEL
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._lock_fd: int | None = None
        # Commands another instance may ask of this one about a call it holds (`ask`): each
        # gets the call SID and the arguments, and returns the reply (a small JSON object:
        # a NOTIFY payload is at most 8000 bytes).
        self.handlers: dict[str, Handler] = {"hangup": self._hangup_here}
        self._closed = False
        self._spool_done = asyncio.Event()
        self.wake = asyncio.Event()  # tests: run a heartbeat now

    def __repr__(self) -> str:
        return f"Fleet({self.instance_id!r}, lease_ok={self.lease_ok})"

    # -- life ------------------------------------------------------------------------

    async def start(self) -> None:
        """Join: lock the SQLite file, take the lease (a named instance's previous run is
        closed first), listen for commands, start the heartbeat. Raises `FleetError`."""
        if not self.postgres:
            self._lock_sqlite()
        await self._register()
        if self.postgres:
            await self._listen()
        self._spawn(self._spool_written())
        self._heartbeat = asyncio.ensure_future(self._beat())

    async def _spool_written(self) -> None:
        # Writes an earlier run left in the spool go first: a call that ended during a
        # database outage keeps its true end instead of being reconciled as left open.
        if not await self.store.wait_written(self.lease_s):
            log_event(
                log, "fleet.reconcile_waits", logging.WARNING, detail="spooled records are not written yet"
            )
            await self.store.wait_written(float("inf"))
        self._spool_done.set()

    async def stop(self) -> None:
        """Stop the heartbeat, the listener and any reconciliation under way (the lease is
        kept until `release`)."""
        self._closed = True
        # gather(return_exceptions=True), not suppress(CancelledError) around each await, which
        # would swallow a cancellation of this stop too. The heartbeat first: the
        # reconciliations it started are then all in `_tasks`.
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._listener is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self._listener.close()
            self._listener = None

    async def release(self, calls_written: bool) -> None:
        """Leave the fleet at a clean stop. `calls_written`: every call of this run is ended
        and its record written, so the lease row goes; otherwise it stays and expires, and
        another instance (or the next run) reconciles what is left open."""
        if calls_written and self.lease_ok:
            try:
                await self.tables.release(self.instance_id, self.run_id)
                log_event(log, "fleet.left", instance=self.instance_id)
            except Exception as exc:
                log_event(log, "fleet.release_failed", logging.WARNING, error=str(exc))
        self.lease_ok = False
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _lock_sqlite(self) -> None:
        self._lock_fd = sqlite_lock(self.store.url)

    async def _register(self) -> None:
        deadline = time.monotonic() + self.lease_s * 2 + 5
        seen: Lease | None = None
        while True:
            held = await self.tables.register(
                self.instance_id, self.run_id, self.host, self.pid, self.expiry_s
            )
            if held is None:
                break
            now = await self.tables.now()
            gone_here = held.host == self.host and held.pid != self.pid and not pid_alive(held.pid)
            if held.reconciled_by is None and (gone_here or held.expires_at < now):
                # This id's previous run: close its calls as any instance would, then go on.
                cutoff = await self.tables.claim(held, self.instance_id, expired_only=not gone_here)
                if cutoff is not None and await self.tables.take_over(
                    self.instance_id, held.run_id, self.run_id, self.host, self.pid, self.expiry_s
                ):
                    self._spawn(self._reconcile_previous_run(held, cutoff))
                    break
                continue
            if seen is not None and held.run_id == seen.run_id and held.renewed_at != seen.renewed_at:
                raise FleetError(
                    f"instance id {self.instance_id!r} is in use by a live instance (host {held.host}, "
                    f"pid {held.pid}): give every instance its own CALLBRIDGE_INSTANCE_ID, or leave it unset"
                )
            if time.monotonic() > deadline:
                raise FleetError(
                    f"instance id {self.instance_id!r} is held by run {held.run_id[:8]} (host {held.host}, "
                    f"pid {held.pid}) and was not released: give every instance its own "
                    "CALLBRIDGE_INSTANCE_ID"
                )
            if seen is None:
                log_event(
                    log,
                    "fleet.waiting_for_lease",
                    logging.WARNING,
                    instance=self.instance_id,
                    held_by_host=held.host,
                    held_by_pid=held.pid,
                    expires_at=held.expires_at.isoformat(),
                )
            seen = held
            await asyncio.sleep(0.5)
        self.lease_ok = True
        self._renewed = time.monotonic()
        self._healthy_since = self._renewed
        log_event(
            log,
            "fleet.joined",
            instance=self.instance_id,
            run=self.run_id[:8],
            lease_s=self.lease_s,
            database="postgresql" if self.postgres else "sqlite",
        )

    # -- the heartbeat ---------------------------------------------------------------

    async def _beat(self) -> None:
        interval = self.heartbeat_s
        while not self._closed:
            await self.beat_once()
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self.wake.wait()

    async def beat_once(self) -> None:
        """Renew the lease, then reconcile dead runs (each step isolated)."""
        try:
            await self._renew()
        except Exception as exc:
            self._healthy_since = None
            if time.monotonic() - self._renewed > self.expiry_s / 2:
                self.lease_ok = False  # two heartbeats missed: /readyz says so before it expires
            log_event(log, "fleet.renew_failed", logging.WARNING, instance=self.instance_id, error=str(exc))
            return
        if self._healthy_since is None:
            self._healthy_since = time.monotonic()
        if not self._spool_done.is_set():
            return
        try:
            await self.reconcile_dead()
        except Exception:
            log.exception("fleet: reconciling dead instances failed (retried at the next heartbeat)")
        if self.postgres:
            try:
                await self.tables.prune(ENDED_KEPT_S)
            except Exception as exc:
                log_event(log, "fleet.prune_failed", logging.WARNING, error=str(exc))

    async def _renew(self) -> None:
        ok = await self.tables.renew(
            self.instance_id, self.run_id, self.expiry_s, self.bridge.live_calls, not self.bridge.accepting
        )
        if ok:
            self.lease_ok = True
            self._renewed = time.monotonic()
            return
        # Our lease expired and another instance reconciled this run (a long database
        # outage, a paused process): the calls it held were hung up. Join again.
        self.lease_ok = False
        log_event(
            log,
            "fleet.lease_lost",
            logging.ERROR,
            instance=self.instance_id,
            live_calls=self.bridge.live_calls,
            detail="the lease expired and another instance reconciled this run's calls; joining again",
        )
        self.run_id = uuid.uuid4().hex
        await self._register()

    async def reconcile_dead(self) -> int:
        """Claim and reconcile every dead run (expired lease, or a process gone from this
        host); the number reconciled here."""
        now, leases = await self.tables.leases()
        # Expired leases are judged only by an instance that has itself renewed without a gap for
        # a lease period (a process gone from this host is certain at once).
        healthy = self._healthy_since is not None and time.monotonic() - self._healthy_since >= self.expiry_s
        live_ids = {
            lease.instance_id for lease in leases if lease.expires_at >= now and lease.reconciled_by is None
        }
        done = 0
        for lease in leases:
            if lease.instance_id == self.instance_id and lease.run_id == self.run_id:
                continue
            if lease.reconciled_by == self.instance_id:
                # Claimed here and not finished (the reconciliation failed: a timeout, the
                # database): go on with it. Its own run cannot have taken the row back meanwhile.
                await self._reconcile_run(lease, now)
                await self.tables.release(lease.instance_id, lease.run_id)
                done += 1
                continue
            gone_here = lease.host == self.host and lease.pid != self.pid and not pid_alive(lease.pid)
            stale_claim = lease.reconciled_by is not None and lease.reconciled_by not in live_ids
            if lease.reconciled_by is not None and not stale_claim:
                continue  # being reconciled by a live instance
            if not (gone_here or (healthy and (lease.expires_at < now or stale_claim))):
                continue
            cutoff = await self.tables.claim(
                lease, self.instance_id, expired_only=not gone_here and not stale_claim
            )
            if cutoff is None:
                continue  # renewed, released or claimed by another instance first
            await self._reconcile_run(lease, cutoff)
            await self.tables.release(lease.instance_id, lease.run_id)
            done += 1
        if healthy:
            done += await self._reconcile_orphans(leases, now)
        return done

    async def _reconcile_orphans(self, leases: list[Lease], now: datetime) -> int:
        """Active records of an instance with no lease row at all (a release before leases;
        or a row removed by hand): claimed through a lease row made for the purpose."""
        orphans = await self.tables.orphaned({lease.instance_id for lease in leases}, now)
        done = 0
        for instance, sids in orphans.items():
            marker = f"orphan-{uuid.uuid4().hex}"
            held = await self.tables.register(instance, marker, "", 0, 0.0, reconciled_by=self.instance_id)
            if held is not None:
                continue  # that instance has a lease now (it just started), or another claims it
            try:
                await self._reconcile_calls(instance, sids, "its calls were found open with no lease")
            finally:
                await self.tables.release(instance, marker)
            done += 1
        return done

    async def _reconcile_run(self, lease: Lease, cutoff: datetime, previous_run: bool = False) -> None:
        try:
            await self._spool_done.wait()
            sids = await self.tables.held_by(lease.instance_id, cutoff)
            why = (
                "this instance's previous run stopped while the call was live"
                if previous_run
                else f"instance {lease.instance_id} (host {lease.host}, pid {lease.pid}) stopped while "
                "the call was live"
            )
            log_event(
                log,
                "fleet.reconciling",
                logging.WARNING,
                dead_instance=lease.instance_id,
                calls=len(sids),
                previous_run=previous_run,
            )
            await self._reconcile_calls(lease.instance_id, sids, why)
            self.reconciled_runs += 1
        except Exception:
            log.exception("fleet: reconciling the calls of %s failed (taken up again)", lease.instance_id)
            raise

    async def _reconcile_previous_run(self, lease: Lease, cutoff: datetime) -> None:
        """This id's previous run, whose row this run took over: nobody else will close its
        calls, so a failure is retried here until it succeeds or the process stops."""
        delay = self.heartbeat_s
        while not self._closed:
            try:
                await self._reconcile_run(lease, cutoff, previous_run=True)
                return
            except Exception:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.lease_s)

    async def _reconcile_calls(self, dead: str, sids: list[str], why: str) -> None:
        todo = []
        for sid in sids:
            if self.bridge.find(sid) is not None:
                continue  # live here (its stream moved to this instance)
            if self.postgres:
                owner = await self.tables.owner(sid)
                if owner is not None and owner[0] != dead and owner[1]:
                    continue  # held by a live instance now
            todo.append(sid)
        await reconcile(
            self.store, self.control, todo, EndReason.INSTANCE_LOST, f"{why}; {self.instance_id} found it"
        )
        if self.postgres:
            await self.tables.ended(todo)

    # -- fleet rules on a call's set-up path (fail open) --------------------------------

    async def _setup_check(self, what: str, call_sid: str, work: Awaitable[bool]) -> bool:
        try:
            async with asyncio.timeout(SETUP_TIMEOUT_S):
                return await work
        except Exception as exc:
            log_event(
                log,
                "fleet.check_skipped",
                logging.WARNING,
                call_sid=call_sid,
                check=what,
                error=f"{type(exc).__name__}: {exc}"[:200],
                detail="the database did not answer; the per-instance check still applies",
            )
            return True

    async def answered(self, call_sid: str) -> bool:
        """A call is answered here with stream TwiML: held by this instance until its stream
        connects; False if the fleet is at its cap."""
        if not self.postgres:
            return True
        return await self._setup_check(
            "fleet_cap", call_sid, self.tables.answered(call_sid, self.instance_id, self.fleet_cap)
        )

    async def room(self) -> bool:
        """Whether the fleet cap leaves room for one more call (an outbound call, before it
        is placed)."""
        if not self.postgres or self.fleet_cap is None:
            return True
        return await self._setup_check("fleet_cap", "", self.tables.room(self.fleet_cap))

    async def placed(self, call_sid: str) -> None:
        """An outbound call was placed from here: held by this instance until its stream connects."""
        if self.postgres:
            await self._setup_check(
                "fleet_hold", call_sid, self.tables.answered(call_sid, self.instance_id, None)
            )

    async def stream_started(self, call_sid: str) -> bool:
        """A stream passed its token check here: take the call; False if the token was used
        before, on any instance."""
        if not self.postgres:
            return True
        return await self._setup_check(
            "stream_token", call_sid, self.tables.stream_started(call_sid, self.instance_id)
        )

    def call_ended(self, call_sid: str) -> None:
        if self.postgres and not self._closed:
            self._spawn(self._mark_ended(call_sid))

    async def _mark_ended(self, call_sid: str) -> None:
        for delay in (0.0, 1.0, 5.0):  # best effort: the heartbeat's reconcile is the net
            await asyncio.sleep(delay)
            try:
                await self.tables.ended([call_sid])
                return
            except Exception as exc:
                last = exc
        log_event(log, "fleet.end_not_written", logging.WARNING, call_sid=call_sid, error=str(last))

    # -- commands --------------------------------------------------------------------

    async def _listen(self) -> None:
        import asyncpg
        from sqlalchemy.engine import make_url

        dsn = make_url(self.store.url).set(drivername="postgresql").render_as_string(hide_password=False)
        self._dsn = dsn
        async with asyncio.timeout(self.tables.timeout + 1):
            conn = await asyncpg.connect(dsn, timeout=self.tables.timeout)
        await conn.add_listener(CHANNEL, self._on_notify)
        conn.add_termination_listener(self._on_listener_lost)
        self._listener = conn

    def _on_listener_lost(self, _conn: Any) -> None:
        if self._closed:
            return
        log_event(log, "fleet.listener_lost", logging.WARNING, instance=self.instance_id)
        self._listener = None
        self._spawn(self._relisten())

    async def _relisten(self) -> None:
        delay = 0.2
        while not self._closed and self._listener is None:
            try:
                await self._listen()
                log_event(log, "fleet.listener_back", instance=self.instance_id)
                return
            except Exception:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            message = json.loads(payload)
            if not isinstance(message, dict) or message.get("to") != self.instance_id:
                return
            kind = message.get("kind")
            call_sid = str(message.get("call_sid", ""))
        except ValueError:
            log_event(log, "fleet.bad_command", logging.WARNING, payload=payload[:200])
            return
        self.commands_received += 1
        if kind == "reply":
            future = self._replies.pop(str(message.get("req")), None)
            if future is not None and not future.done():
                future.set_result(message)
        elif kind == "status":
            self._do_status(message, call_sid)
        elif isinstance(kind, str) and kind in self.handlers:
            self._spawn(self._answer(message, call_sid, self.handlers[kind]))
        else:
            log_event(log, "fleet.bad_command", logging.WARNING, kind=str(kind)[:40], call_sid=call_sid)

    async def _send(self, message: dict[str, Any]) -> None:
        from sqlalchemy import text

        message["from"] = self.instance_id
        async with asyncio.timeout(self.tables.timeout), self.store.engine.begin() as conn:
            await conn.execute(text("SELECT pg_notify(:c, :p)"), {"c": CHANNEL, "p": json.dumps(message)})
        self.commands_sent += 1

    async def _answer(self, message: dict[str, Any], call_sid: str, handler: Handler) -> None:
        kind, args = message.get("kind"), message.get("args")
        log_event(log, "fleet.command", call_sid=call_sid, command=kind, sender=message.get("from"))
        reply: dict[str, Any] = {"to": message.get("from"), "kind": "reply", "req": message.get("req")}
        try:
            reply.update(await handler(call_sid, args if isinstance(args, dict) else {}))
        except Exception:
            log.exception("fleet: the %s command for %s failed", kind, call_sid)
            reply.update(found=False, error="the holding instance failed to run the command")
        try:
            await self._send(reply)
        except Exception as exc:
            log_event(log, "fleet.reply_failed", logging.WARNING, call_sid=call_sid, error=str(exc))

    async def _hangup_here(self, call_sid: str, _args: dict[str, Any]) -> dict[str, Any]:
        record = await self.bridge.hangup(call_sid)
        if record is None:
            return {"found": False}
        return {"found": True, "status": record.status, "end_reason": record.end_reason}

    def _do_status(self, message: dict[str, Any], call_sid: str) -> None:
        from callbridge.server.state import STREAM_FIRST_SECONDS

        call = self.bridge.find(call_sid)
        status = str(message.get("status", ""))[:40]
        log_event(
            log,
            "fleet.command",
            call_sid=call_sid,
            command="status",
            status=status,
            sender=message.get("from"),
        )
        if call is not None:
            call.carrier_ended(
                f"status callback: {status} (received by {message.get('from')})", after=STREAM_FIRST_SECONDS
            )

    async def stream_taken(self, call_sid: str) -> bool:
        """Whether the call's stream started on some instance (False on any doubt)."""
        if not self.postgres:
            return False
        try:
            return await self.tables.stream_taken(call_sid)
        except Exception as exc:
            log_event(log, "fleet.owner_unknown", logging.WARNING, call_sid=call_sid, error=str(exc))
            return False

    async def holder(self, call_sid: str) -> str | None:
        """Another live instance that holds `call_sid`, if any (None on any doubt)."""
        if not self.postgres:
            return None
        try:
            owner = await self.tables.owner(call_sid)
        except Exception as exc:
            log_event(log, "fleet.owner_unknown", logging.WARNING, call_sid=call_sid, error=str(exc))
            return None
        if owner is None or owner[0] == self.instance_id or not owner[1]:
            return None
        return owner[0]

    async def hangup_elsewhere(self, call_sid: str) -> dict[str, Any] | None:
        """Ask the instance holding `call_sid` to hang it up: its reply (`found`, `status`,
        `end_reason`), or None when no live instance holds it or none answered in time."""
        return await self.ask(call_sid, "hangup", {}, REPLY_TIMEOUT_S)

    async def ask(
        self, call_sid: str, kind: str, args: dict[str, Any], timeout: float
    ) -> dict[str, Any] | None:
        """Run command `kind` (a key of `handlers` there) on the live instance holding
        `call_sid`: its reply (with `instance`), or None when no live instance holds the call
        or none answered within `timeout`."""
        holder = await self.holder(call_sid)
        if holder is None:
            return None
        req = uuid.uuid4().hex
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[req] = future
        message = {"to": holder, "kind": kind, "call_sid": call_sid, "req": req, "args": args}
        try:
            await self._send(message)
            async with asyncio.timeout(timeout):
                reply = await future
        except Exception as exc:
            log_event(
                log,
                "fleet.command_unanswered",
                logging.WARNING,
                call_sid=call_sid,
                holder=holder,
                error=str(exc),
            )
            return None
        finally:
            self._replies.pop(req, None)
        reply["instance"] = holder
        return reply

    async def status_elsewhere(self, call_sid: str, status: str) -> bool:
        """Deliver a carrier status callback to the live instance holding the call."""
        holder = await self.holder(call_sid)
        if holder is None:
            return False
        try:
            await self._send({"to": holder, "kind": "status", "call_sid": call_sid, "status": status})
        except Exception as exc:
            log_event(log, "fleet.command_failed", logging.WARNING, call_sid=call_sid, error=str(exc))
            return False
        return True

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


# For the composition: a run of `Fleet.start` bounded like the store's opening.
async def join(fleet: Fleet, timeout: float) -> None:
    try:
        async with asyncio.timeout(timeout):
            await fleet.start()
    except FleetError:
        raise
    except Exception as exc:
        raise FleetError(f"cannot join the fleet: {type(exc).__name__}: {exc}"[:300]) from None
