"""Answering machines on outbound calls: Twilio's asynchronous answering-machine detection.

`POST /calls {"machine_detection": "hangup" | "agent"}` places the call with
`MachineDetection=DetectMessageEnd` and `AsyncAmd=true`: the call's TwiML (the media stream
to the agent) runs at once, and Twilio later posts its verdict, signed like any webhook, to
`POST /twilio/amd?mode=<mode>` (the mode travels in the URL Twilio signs, so any instance
can act on it). The verdict (`AnsweredBy`) is kept in the call's record; then:

- `human`, `unknown`: nothing changes;
- a machine (`machine_end_beep`, `machine_end_silence`, `machine_end_other`, or
  `machine_start`) with `hangup`, or a `fax`: the call ends `voicemail` (hung up);
- a machine with `agent`: the agent gets a `contextual_update` saying it reached voicemail
  after the beep, leaves its message and ends the call itself (`agent_ended`).

A callback with a bad signature is refused 403; one for a call this server does not know
is refused 404 and changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from callbridge.call import Call, EndReason
from callbridge.config import Settings
from callbridge.logs import log_event
from callbridge.server.state import AppState
from callbridge.telephony.base import CallControlError
from callbridge.telephony.twilio.webhooks import CALL_SID_RE, error, signed_form

__all__ = [
    "AMD_PATH",
    "ANSWERED_BY",
    "MACHINE_DETECTION_MODES",
    "VOICEMAIL_UPDATE",
    "amd_arguments",
    "amd_callback",
    "fleet_amd",
]

log = logging.getLogger("callbridge.server")

AMD_PATH = "/twilio/amd"
MACHINE_DETECTION_MODES = ("off", "hangup", "agent")
# How long a verdict waits for the media stream of a call answered but not connected yet
# (normally connected well before a machine's greeting has ended and its verdict comes).
STREAM_WAIT_SECONDS = 3.0
HUMAN = frozenset({"human", "unknown"})
MACHINE = frozenset({"machine_start", "machine_end_beep", "machine_end_silence", "machine_end_other"})
ANSWERED_BY = HUMAN | MACHINE | {"fax"}
VOICEMAIL_UPDATE = (
    "The call was answered by an answering machine, not a person, and its greeting has "
    "ended (the beep has sounded): you are now recording a voicemail. Leave a short message "
    "for the person you called, then end the call."
)


def amd_arguments(settings: Settings, mode: str) -> dict[str, Any]:
    """The `place_call` keyword arguments for a `machine_detection` mode (none for off)."""
    if mode not in ("hangup", "agent"):
        return {}
    return {"machine_detection_url": settings.public(f"{AMD_PATH}?mode={mode}")}


async def amd_callback(request: Request) -> Response:
    """`POST /twilio/amd?mode=hangup|agent`: Twilio's answering-machine verdict."""
    state: AppState = request.app.state.callbridge
    form = await signed_form(request, state)
    if isinstance(form, Response):
        return form
    call_sid, answered_by = form.get("CallSid", ""), form.get("AnsweredBy", "")
    mode = request.query_params.get("mode", "")
    if not CALL_SID_RE.fullmatch(call_sid):
        return error(400, "CallSid missing or malformed")
    if answered_by not in ANSWERED_BY:
        return error(400, f"AnsweredBy must be one of {', '.join(sorted(ANSWERED_BY))}")
    if mode not in ("hangup", "agent"):
        return error(400, "mode must be hangup or agent")
    call = state.bridge.find(call_sid)
    if call is None and state.fleet is not None:
        holder = await state.fleet.holder(call_sid)
        if holder is not None:
            return await _held_elsewhere(state, call_sid, answered_by, mode, holder)
    record: dict[str, Any] | None = None
    if call is None:
        record = await state.store.get(call_sid)  # StoreUnavailable: 503 (app-wide handler)
        if record is None:
            log_event(log, "amd.unknown_call", logging.WARNING, call_sid=call_sid, answered_by=answered_by)
            return error(404, "no such call")
    await state.store.set_answered_by(call_sid, answered_by)
    log_event(
        log,
        "amd.result",
        call_sid=call_sid,
        answered_by=answered_by,
        mode=mode,
        detection_ms=form.get("MachineDetectionDuration", ""),
        live_here=call is not None,
    )
    await _act(state, call_sid, call, record, answered_by, mode)
    return Response(status_code=204)


async def _act(
    state: AppState,
    call_sid: str,
    call: Call | None,
    record: dict[str, Any] | None,
    answered_by: str,
    mode: str,
) -> None:
    """What a verdict does to the call (live here, or known from its `record`)."""
    if answered_by in HUMAN:
        return
    detail = f"answered by {answered_by} (machine detection: {mode})"
    to_agent = mode == "agent" and answered_by in MACHINE
    # A verdict that came before the call's media stream, or before its agent: wait, bounded.
    if call is None and record is not None and record.get("status") != "ended":
        call = await _until_live(state, call_sid, False, STREAM_WAIT_SECONDS)
    if to_agent and call is not None and not _agent_ready(call):
        call = await _until_live(state, call_sid, True, state.settings.agent_connect_timeout)
    if to_agent:
        # Call.send_contextual_update also keeps it in the record's timeline.
        if call is None or not await call.send_contextual_update(VOICEMAIL_UPDATE):
            log_event(log, "amd.agent_not_live", logging.WARNING, call_sid=call_sid, answered_by=answered_by)
        return
    if call is not None:
        call.request_end(EndReason.VOICEMAIL, detail)
    elif record is not None and record.get("status") != "ended":
        # Still not live here (its stream never connected): closed first, then hung up, so
        # the status callback the hang-up brings finds it closed.
        await state.store.close_record(call_sid, EndReason.VOICEMAIL.value, detail)
        try:
            await state.control.hangup(call_sid)
        except CallControlError as exc:
            log_event(log, "amd.hangup_failed", logging.ERROR, call_sid=call_sid, error=str(exc))


def _agent_ready(call: Call) -> bool:
    return (call.agent is not None and call.agent.is_open) or call.end_reason is not None


async def _until_live(state: AppState, call_sid: str, need_agent: bool, bound: float) -> Call | None:
    """The call once it is live here (with its agent connected, if `need_agent`), or
    whatever is known of it after `bound` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound
    while True:
        call = state.bridge.find(call_sid)
        if call is not None and (not need_agent or _agent_ready(call)):
            return call
        if loop.time() >= deadline:
            return call
        await asyncio.sleep(0.05)


async def _held_elsewhere(
    state: AppState, call_sid: str, answered_by: str, mode: str, holder: str
) -> Response:
    """The verdict reached another instance than the one holding the call (behind a load
    balancer): recorded here, and acted on by the holder (the fleet's `amd` command)."""
    assert state.fleet is not None
    await state.store.set_answered_by(call_sid, answered_by)
    log_event(log, "amd.result", call_sid=call_sid, answered_by=answered_by, mode=mode, holder=holder)
    if answered_by in HUMAN:
        return Response(status_code=204)
    args = {"answered_by": answered_by, "mode": mode}
    reply = await state.fleet.ask(call_sid, "amd", args, state.settings.agent_connect_timeout + 5.0)
    if reply is None or not reply.get("found"):
        log_event(log, "amd.holder_unanswered", logging.WARNING, call_sid=call_sid, holder=holder)
    return Response(status_code=204)


async def fleet_amd(state: AppState, call_sid: str, args: dict[str, Any]) -> dict[str, Any]:
    """The `amd` command another instance sends to the one holding the call."""
    answered_by, mode = args.get("answered_by"), args.get("mode")
    call = state.bridge.find(call_sid)
    if call is None or answered_by not in ANSWERED_BY or mode not in ("hangup", "agent"):
        return {"found": False}
    await _act(state, call_sid, call, None, str(answered_by), str(mode))
    return {"found": True}
