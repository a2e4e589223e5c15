"""The stream-connect watchdog: a call answered with stream TwiML whose media stream
never connects is closed `no_media_stream` instead of staying `active` forever.

A proxy that drops WebSocket upgrades, a wrong public URL, a firewall: Twilio answers
the call, runs `<Connect><Stream>`, and the bridge never hears of it again except
through status callbacks (if configured). `StreamWatch` keeps each answered call
until its stream proves itself (`connected`), and then forgets it. Otherwise:

* a status callback that says the call is over (`carrier_ended`) closes the record
  at once, with what Twilio said;
* after `timeout` seconds with no stream, the call is fetched from Twilio's REST API;
  if it is still queued, ringing or in progress it is hung up. The record is closed
  BEFORE the hang-up (as in crash recovery): the hang-up makes Twilio send a status
  callback, which must find the record already closed with what happened here.
  An outbound call still queued or ringing has not been answered yet (its stream
  cannot connect before that; Twilio rings for up to 60 s by default): it is
  checked again after another `timeout`, never hung up for ringing.

Several processes (`--workers N`, or instances sharing a database) may answer the
webhook on one and take the stream on another: `settled(call_sid)`, when given, asks
the shared records before anything is done whether the call needs nothing from the
watchdog (a stream started on some process, or the record is already ended). Without
it, only calls answered by this process are handled.

The record of an inbound call may not exist yet (it is written when the stream
starts): it is created from what the webhook said, then closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from callbridge.call import EndReason
from callbridge.logs import call_extra, log_event
from callbridge.recovery import WRITE_FIRST_S
from callbridge.telephony.base import CallControl, CallControlError

__all__ = ["END_STATUSES", "STILL_UP", "ExpectedCall", "RecordCloser", "StreamWatch"]

log = logging.getLogger("callbridge.streamwatch")

END_STATUSES = frozenset({"completed", "failed", "busy", "no-answer", "canceled"})
STILL_UP = frozenset({"queued", "ringing", "in-progress"})
NOT_ANSWERED = frozenset({"queued", "ringing"})
REASON = EndReason.NO_MEDIA_STREAM.value
# Calls whose stream connected here, remembered so their end callbacks cost nothing.
_CONNECTED_KEPT = 10_000


class RecordCloser(Protocol):
    """What the watchdog needs of the record store (return values, if any, are not used)."""

    async def create_placeholder(self, call_sid: str, direction: str, from_: str, to: str) -> object: ...

    async def close_record(self, call_sid: str, reason: str, detail: str, force: bool = False) -> object: ...

    async def wait_call_written(self, call_sid: str, timeout: float) -> bool: ...


@dataclass(frozen=True)
class ExpectedCall:
    """What the webhook (inbound) or the create request (outbound) said about the call."""

    direction: str  # "inbound" | "outbound"
    from_: str = ""
    to: str = ""


@dataclass
class _Entry:
    info: ExpectedCall
    timeout: float
    handle: asyncio.TimerHandle | None = None
    checks: int = 0
    statuses: list[str] = field(default_factory=list)


class StreamWatch:
    """Watches the calls answered with stream TwiML until their stream connects."""

    def __init__(
        self,
        control: CallControl,
        store: RecordCloser,
        timeout: float,
        settled: Callable[[str], Awaitable[bool]] | None = None,
        counts: dict[str, int] | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("the stream connect timeout must be positive")
        self.control = control
        self.store = store
        self.timeout = timeout
        self.settled = settled
        # reason -> calls ended (the bridge's stats, shown in /metrics): closes are added here.
        self.counts = counts if counts is not None else {}
        self.closed_no_stream = 0  # records this watchdog closed `no_media_stream`
        self.hung_up = 0  # calls it hung up at Twilio
        self._pending: dict[str, _Entry] = {}
        self._connected: OrderedDict[str, None] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def pending(self) -> int:
        """Calls answered whose stream has not connected (and that are not closed yet)."""
        return len(self._pending)

    # -- the API ---------------------------------------------------------------

    def expect(self, call_sid: str, info: ExpectedCall) -> None:
        """The call was answered with stream TwiML (or created with it): start its clock."""
        if self._closed or call_sid in self._connected:
            return
        old = self._pending.pop(call_sid, None)
        if old is not None and old.handle is not None:
            old.handle.cancel()  # a repeated webhook restarts the clock
        entry = _Entry(info, self.timeout)
        self._pending[call_sid] = entry
        self._arm(call_sid, entry)

    def connected(self, call_sid: str) -> None:
        """The call's stream proved itself on this process: stop watching it."""
        entry = self._pending.pop(call_sid, None)
        if entry is not None and entry.handle is not None:
            entry.handle.cancel()
        self._connected[call_sid] = None
        self._connected.move_to_end(call_sid)
        while len(self._connected) > _CONNECTED_KEPT:
            self._connected.popitem(last=False)

    async def carrier_ended(self, call_sid: str, status: str) -> bool:
        """A status callback says the call is over (no live stream here holds it).

        Returns True when the record was closed `no_media_stream` here; False when the
        call is not the watchdog's business (its stream connected here or elsewhere, or
        `status` does not end a call).
        """
        if status not in END_STATUSES or call_sid in self._connected:
            return False
        entry = self._pending.pop(call_sid, None)
        if entry is not None and entry.handle is not None:
            entry.handle.cancel()
        if entry is None and self.settled is None:
            return False  # not answered here, and no shared records to tell whether it streamed
        if await self._settled(call_sid):
            return False
        what = {
            "completed": "ended",
            "canceled": "was canceled",
            "busy": "was busy",
            "no-answer": "was not answered",
            "failed": "failed",
        }.get(status, status)
        said = f"Twilio's status callback said the call {what} ({status})"
        if entry is None:
            # Not answered by this process (another worker, or before a restart): the status
            # callback has just written the record from its own form, if it was missing.
            ok = await self._close(call_sid, f"no media stream of this call reached any process; {said}")
        else:
            ok = await self._close(call_sid, f"the media stream never connected; {said}", entry.info)
        if ok:
            log_event(log, "call.no_media_stream", logging.WARNING, call_sid=call_sid, twilio_status=status)
        return ok

    async def close(self) -> None:
        """Stop watching: cancel every clock and every check under way (shutdown)."""
        self._closed = True
        for entry in self._pending.values():
            if entry.handle is not None:
                entry.handle.cancel()
        self._pending.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- the clock -------------------------------------------------------------

    def _arm(self, call_sid: str, entry: _Entry) -> None:
        loop = asyncio.get_running_loop()
        entry.handle = loop.call_later(entry.timeout, self._fire, call_sid, entry)

    def _fire(self, call_sid: str, entry: _Entry) -> None:
        entry.handle = None
        if self._closed or self._pending.get(call_sid) is not entry:
            return
        task = asyncio.ensure_future(self._expired(call_sid, entry))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _still_ours(self, call_sid: str, entry: _Entry) -> bool:
        # False once the stream connected, a status callback closed it, or shutdown began.
        return not self._closed and self._pending.get(call_sid) is entry

    async def _expired(self, call_sid: str, entry: _Entry) -> None:
        try:
            await self._check(call_sid, entry)
        except asyncio.CancelledError:
            raise
        except Exception:  # never let one call's check die silently
            log.exception("stream watchdog check of %s failed", call_sid, extra=call_extra(call_sid))
            if self._pending.get(call_sid) is entry:
                del self._pending[call_sid]

    async def _check(self, call_sid: str, entry: _Entry) -> None:
        entry.checks += 1
        waited = entry.timeout * entry.checks
        settled = await self._settled(call_sid)
        if settled:
            # Another process took the stream (it records the call's end itself), or closed it.
            if self._pending.get(call_sid) is entry:
                del self._pending[call_sid]
            return
        if settled is None and self._still_ours(call_sid, entry):
            # The records database is down: the stream may be live on another worker or
            # instance, and hanging up a live call is worse than checking again later.
            self._arm(call_sid, entry)
            return
        if not self._still_ours(call_sid, entry):
            return
        prefix = f"the media stream did not connect within {waited:g}s; Twilio"
        try:
            status = await self.control.fetch_status(call_sid)
        except CallControlError as exc:
            if not self._still_ours(call_sid, entry):
                return
            del self._pending[call_sid]
            # The stream is missing whatever Twilio says: a call still up is a caller in
            # silence, so it is hung up all the same (idempotent if it is over).
            await self._close_then_hang_up(
                call_sid, entry, None, f"{prefix} status could not be read ({exc})"
            )
            return
        if not self._still_ours(call_sid, entry):
            return
        if status is not None:
            entry.statuses.append(status)
        if status in NOT_ANSWERED and entry.info.direction == "outbound":
            # Still ringing: the stream cannot connect before the callee answers.
            log_event(log, "streamwatch.still_ringing", call_sid=call_sid, twilio_status=status)
            self._arm(call_sid, entry)
            return
        del self._pending[call_sid]
        if status is None:
            await self._finish(call_sid, entry, None, f"{prefix} had no such call", hung_up=False)
        elif status in STILL_UP:
            await self._close_then_hang_up(call_sid, entry, status, f"{prefix} reported it {status}")
        else:
            await self._finish(call_sid, entry, status, f"{prefix} reported it {status}", hung_up=False)

    async def _close_then_hang_up(self, call_sid: str, entry: _Entry, status: str | None, found: str) -> None:
        # Close first: the hang-up triggers a `completed` status callback, which must find
        # the record already closed with what happened here; written, not only queued, since
        # that callback may reach another instance (bounded: an outage delays no hang-up).
        await self._close(call_sid, f"{found}: hung up", entry.info)
        await self.store.wait_call_written(call_sid, WRITE_FIRST_S)
        try:
            await self.control.hangup(call_sid)
        except CallControlError as exc:
            await self._close(call_sid, f"{found}; the hang-up failed ({exc})", entry.info, force=True)
            self._log(call_sid, status, hung_up=False)
            return
        self.hung_up += 1
        self._log(call_sid, status, hung_up=True)

    async def _finish(
        self, call_sid: str, entry: _Entry, status: str | None, detail: str, hung_up: bool
    ) -> None:
        await self._close(call_sid, detail, entry.info)
        self._log(call_sid, status, hung_up=hung_up)

    def _log(self, call_sid: str, status: str | None, hung_up: bool) -> None:
        log_event(
            log,
            "call.no_media_stream",
            logging.WARNING,
            call_sid=call_sid,
            twilio_status=status,
            hung_up=hung_up,
            waited_s=self.timeout,
        )

    # -- records ---------------------------------------------------------------

    async def _settled(self, call_sid: str) -> bool | None:
        """Whether another process took the stream or closed the call; None: unknown
        (the shared records could not be read)."""
        if self.settled is None:
            return False
        try:
            return await self.settled(call_sid)
        except Exception as exc:
            log_event(log, "streamwatch.lookup_failed", logging.WARNING, call_sid=call_sid, error=repr(exc))
            return None

    async def _close(
        self, call_sid: str, detail: str, info: ExpectedCall | None = None, force: bool = False
    ) -> bool:
        try:
            if info is not None:
                # An inbound call has no record before its stream starts: make one from
                # what the webhook said (a no-op when the record exists).
                await self.store.create_placeholder(call_sid, info.direction, info.from_, info.to)
            if force:
                await self.store.close_record(call_sid, REASON, detail, force=True)
            else:
                await self.store.close_record(call_sid, REASON, detail)
        except Exception as exc:
            log_event(log, "record.close_failed", logging.ERROR, call_sid=call_sid, error=repr(exc))
            return False
        if not force:
            self.closed_no_stream += 1
            self.counts[REASON] = self.counts.get(REASON, 0) + 1
        return True
