"""`POST /calls/{sid}/transfer {"to": ..., "reason"?: ...}`: hand a live call to a person.

The same transfer as the agent's `transfer_call` tool (`Call.transfer`): the
destination must be on `CALLBRIDGE_TRANSFER_ALLOW` (a leaked API token must not
dial premium numbers), the agent's audio already sent plays to its last mark, then
Twilio is asked to dial the destination. The answer comes once the call has ended
`transferred` (200, the record), or says why not: 403 not allowed, 404 not live
on any instance, 409 already ending or the caller gone, 422 a malformed body, 502 the
redirect failed after its retries (the call has then ended `telephony_error`). A call
held by another instance is transferred there (the fleet's `transfer` command).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from callbridge.call import EndReason
from callbridge.logs import log_event
from callbridge.server.api import NO_SUCH_SID, state_of
from callbridge.server.state import AppState
from callbridge.telephony.base import CallControlError
from callbridge.telephony.twilio.webhooks import CALL_SID_RE, error, read_body
from callbridge.transfer import TransferRefused, check_destination

__all__ = ["fleet_transfer", "transfer_call", "transfer_here"]

log = logging.getLogger("callbridge.server")

MAX_REQUEST_BYTES = 4 * 1024


async def transfer_call(request: Request) -> Response:
    state = state_of(request)
    call_sid = request.path_params["call_sid"]
    if not CALL_SID_RE.fullmatch(call_sid):
        return error(404, NO_SUCH_SID)
    body = await read_body(request, MAX_REQUEST_BYTES)
    if body is None:
        return error(413, "request body too large")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return error(400, "body must be JSON")
    if not isinstance(data, dict) or set(data) - {"to", "reason"}:
        return error(422, 'body must be {"to": "+15551234567" or "sip:...", "reason"?: "..."}')
    reason = data.get("reason", "")
    if not isinstance(reason, str) or len(reason) > 200:
        return error(422, "'reason' must be a string of at most 200 characters")
    try:
        to = check_destination(data.get("to"), state.settings.transfer_allow)
    except TransferRefused as exc:
        malformed = "is not an E.164" in str(exc) or str(exc).startswith("no destination")
        log_event(log, "api.transfer_refused", logging.WARNING, call_sid=call_sid, why=str(exc))
        return error(422 if malformed else 403, str(exc))
    if state.bridge.find(call_sid) is None and state.fleet is not None:
        # Held by another live instance: it runs the transfer (its wait for the last mark
        # included) and answers with the outcome.
        timeout = state.settings.final_audio_timeout + 30
        reply = await state.fleet.ask(call_sid, "transfer", {"to": to, "reason": reason}, timeout)
        if reply is not None and reply.get("found"):
            code = int(reply.get("code", 502))
            if code != 200:
                return error(code, str(reply.get("error", "the transfer failed")))
            shown = await state.store.get(call_sid) or {"call_sid": call_sid}
            shown.update(status="ended", end_reason=reply.get("end_reason"))
            shown["end_detail"] = reply.get("end_detail")
            shown["ended_by_instance"] = reply.get("instance")
            return JSONResponse(shown)
    code, outcome = await transfer_here(state, call_sid, to, reason)
    if code != 200:
        return error(code, str(outcome))
    return JSONResponse(outcome)


async def transfer_here(state: AppState, call_sid: str, to: str, reason: str) -> tuple[int, Any]:
    """Transfer the call live here: (200, the final record) or (the HTTP status, why not)."""
    call = state.bridge.find(call_sid)
    if call is None:
        record = await state.store.get(call_sid)
        if record is not None and record.get("status") == "ended":
            return 409, "call already ended"
        return 404, "no such call live on any instance"
    if call.end_reason is not None or call.transferring is not None:
        return 409, "the call is already ending or being transferred"
    try:
        await call.transfer(to, reason=reason, by="api")
    except CallControlError as exc:
        if call.end_reason is EndReason.CALLER_HUNG_UP:
            return 409, f"the caller hung up during the transfer: {exc}"
        if call.end_reason is EndReason.TELEPHONY_ERROR:
            return 502, str(exc)
        return 409, str(exc)
    # Ended `transferred`: wait for its teardown, so the record shown is the final one.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(state.settings.shutdown_grace_seconds + 10):
            await call.wait_done()
    return 200, await state.store.get(call_sid) or call.record.to_dict()


async def fleet_transfer(state: AppState, call_sid: str, args: dict[str, Any]) -> dict[str, Any]:
    """The `transfer` command another instance sends to the one holding the call (the
    destination was checked against the allow-list there; it is checked again here)."""
    if state.bridge.find(call_sid) is None:
        return {"found": False}
    try:
        to = check_destination(args.get("to"), state.settings.transfer_allow)
    except TransferRefused as exc:
        return {"found": True, "code": 403, "error": str(exc)}
    reason = args.get("reason") if isinstance(args.get("reason"), str) else ""
    code, outcome = await transfer_here(state, call_sid, to, str(reason)[:200])
    if code != 200:
        return {"found": True, "code": code, "error": str(outcome)}
    return {
        "found": True,
        "code": 200,
        "end_reason": outcome.get("end_reason"),
        "end_detail": str(outcome.get("end_detail") or "")[:1000],
    }
