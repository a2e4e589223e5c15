"""`POST /calls/{sid}/transfer {"to": ..., "reason"?: ...}`: hand a live call to a person.

The same transfer as the agent's `transfer_call` tool (`Call.transfer`): the
destination must be on `CALLBRIDGE_TRANSFER_ALLOW` (a leaked API token must not
dial premium numbers), the agent's audio already sent plays to its last mark, then
Twilio is asked to dial the destination. The answer comes once the call has ended
`transferred` (200, the record), or says why not: 403 not allowed, 404 not live
here, 409 already ending or the caller gone, 422 a malformed body, 502 the redirect
failed after its retries (the call has then ended `telephony_error`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from callbridge.call import EndReason
from callbridge.logs import log_event
from callbridge.server.api import NO_SUCH_SID, state_of
from callbridge.telephony.base import CallControlError
from callbridge.telephony.twilio.webhooks import CALL_SID_RE, error, read_body
from callbridge.transfer import TransferRefused, check_destination

__all__ = ["transfer_call"]

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
    call = state.bridge.find(call_sid)
    if call is None:
        record = await state.store.get(call_sid)
        if record is not None and record.get("status") == "ended":
            return error(409, "call already ended")
        return error(404, "no such call live on this instance")
    if call.end_reason is not None or call.transferring is not None:
        return error(409, "the call is already ending or being transferred")
    try:
        await call.transfer(to, reason=reason, by="api")
    except CallControlError as exc:
        if call.end_reason is EndReason.CALLER_HUNG_UP:
            return error(409, f"the caller hung up during the transfer: {exc}")
        if call.end_reason is EndReason.TELEPHONY_ERROR:
            return error(502, str(exc))
        return error(409, str(exc))
    # Ended `transferred`: wait for its teardown, so the record shown is the final one.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(state.settings.shutdown_grace_seconds + 10):
            await call.wait_done()
    return JSONResponse(await state.store.get(call_sid) or call.record.to_dict())
