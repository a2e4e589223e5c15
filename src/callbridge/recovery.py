"""Crash recovery: close the calls a previous run of this instance left open.

A bridge process killed with live calls (SIGKILL, OOM, power) leaves records
`active` and, possibly, phone calls still up at Twilio with nobody on the line.
At start, each record this instance left active is checked with Twilio: a call
still queued, ringing or in progress is hung up; the record is closed with the
`shutdown` reason and a detail that says what was found and done.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from callbridge.call import EndReason
from callbridge.logs import log_event
from callbridge.store import CallStore
from callbridge.telephony.base import CallControl, CallControlError

__all__ = ["Reconciled", "reconcile"]

log = logging.getLogger("callbridge.recovery")

STILL_UP = frozenset({"queued", "ringing", "in-progress"})


@dataclass(frozen=True)
class Reconciled:
    call_sid: str
    twilio_status: str | None
    hung_up: bool
    detail: str


async def reconcile(store: CallStore, control: CallControl, instance: str) -> list[Reconciled]:
    done: list[Reconciled] = []
    for call_sid in await store.active_call_sids(instance):
        prefix = "the bridge process ended while the call was live; at restart"
        hung_up = False
        status: str | None = None
        try:
            status = await control.fetch_status(call_sid)
        except CallControlError as exc:
            detail = f"{prefix} its Twilio status could not be read ({exc})"
        else:
            if status is None:
                detail = f"{prefix} Twilio had no such call"
            elif status in STILL_UP:
                # Close the record first: the hang-up makes Twilio send a status callback,
                # which must find the record already closed with what happened here.
                detail = f"{prefix} Twilio reported it {status}: hung up"
                await store.close_record(call_sid, EndReason.SHUTDOWN.value, detail)
                try:
                    await control.hangup(call_sid)
                    hung_up = True
                except CallControlError as exc:
                    detail = f"{prefix} Twilio reported it {status}; the hang-up failed ({exc})"
                    await store.close_record(call_sid, EndReason.SHUTDOWN.value, detail, force=True)
            else:
                detail = f"{prefix} Twilio reported it {status}"
        await store.close_record(call_sid, EndReason.SHUTDOWN.value, detail)
        log_event(
            log, "call.reconciled", logging.WARNING, call_sid=call_sid, twilio_status=status, hung_up=hung_up
        )
        done.append(Reconciled(call_sid, status, hung_up, detail))
    return done
