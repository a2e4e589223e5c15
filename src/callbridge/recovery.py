"""Closing calls whose instance is gone: hang up what is still up, close the records.

A bridge process that stops with live calls (SIGKILL, OOM, power, a lost database
lease) leaves records `active` and, possibly, phone calls still up at the carrier with
nobody on the line. The fleet (`server/fleet.py`) finds such calls (a dead instance's,
or this instance's own previous run's) and hands them here: each is checked with the
carrier; one still queued, ringing or in progress is hung up; the record is closed with
the reason given (`instance_lost`) and a detail of what was found and done.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from callbridge.lifecycle import EndReason
from callbridge.logs import log_event
from callbridge.store import CallStore
from callbridge.telephony.base import CallControl, CallControlError

__all__ = ["STILL_UP", "Reconciled", "reconcile"]

log = logging.getLogger("callbridge.recovery")

STILL_UP = frozenset({"queued", "ringing", "in-progress"})
WRITE_FIRST_S = 2.0  # longest wait for the closed record to be written before the hang-up


@dataclass(frozen=True)
class Reconciled:
    call_sid: str
    twilio_status: str | None
    hung_up: bool
    detail: str


async def reconcile(
    store: CallStore, control: CallControl, call_sids: Iterable[str], reason: EndReason, why: str
) -> list[Reconciled]:
    """Check each call with the carrier, close its record (`reason`, a detail that starts
    with `why`), and hang it up if it is still up."""
    done: list[Reconciled] = []
    for call_sid in call_sids:
        hung_up = False
        status: str | None = None
        try:
            status = await control.fetch_status(call_sid)
        except CallControlError as exc:
            detail = f"{why}; its carrier status could not be read ({exc})"
        else:
            if status is None:
                detail = f"{why}; the carrier had no such call"
            elif status in STILL_UP:
                # Close the record first: the hang-up makes the carrier send a status callback,
                # which must find the record already closed with what happened here. Written,
                # not only queued: that callback may reach another instance, whose own write
                # would otherwise land first (bounded: a database outage delays no hang-up).
                detail = f"{why}; the carrier reported it {status}: hung up"
                await store.close_record(call_sid, reason.value, detail)
                await store.wait_call_written(call_sid, WRITE_FIRST_S)
                try:
                    await control.hangup(call_sid)
                    hung_up = True
                except CallControlError as exc:
                    detail = f"{why}; the carrier reported it {status}; the hang-up failed ({exc})"
                    await store.close_record(call_sid, reason.value, detail, force=True)
            else:
                detail = f"{why}; the carrier reported it {status}"
        await store.close_record(call_sid, reason.value, detail)
        log_event(
            log,
            "call.reconciled",
            logging.WARNING,
            call_sid=call_sid,
            reason=reason.value,
            twilio_status=status,
            hung_up=hung_up,
        )
        done.append(Reconciled(call_sid, status, hung_up, detail))
    return done
