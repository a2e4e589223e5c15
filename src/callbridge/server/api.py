"""The `/calls` API: place an outbound call, list and read call records, hang up.

Every route needs `Authorization: Bearer <CALLBRIDGE_API_TOKEN>` (compared in
constant time); without the setting the API answers 503 (disabled). When the
records database cannot be read, `StoreUnavailable` becomes a 503 with
`Retry-After` (`store_unavailable`, registered app-wide).

`POST /calls` never answers 5xx once Twilio has placed the call: a client that
retried would ring the person twice.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from callbridge.call import EndReason
from callbridge.config import AGENT_ID_RE
from callbridge.logs import log_event
from callbridge.server.amd import MACHINE_DETECTION_MODES, amd_arguments
from callbridge.server.state import AppState
from callbridge.server.streamwatch import ExpectedCall
from callbridge.telephony.base import CallControlError
from callbridge.telephony.twilio.params import stream_parameters
from callbridge.telephony.twilio.webhooks import CALL_SID_RE, error, read_body

__all__ = [
    "create_call",
    "get_call",
    "hangup_call",
    "list_calls",
    "require_token",
    "store_unavailable",
    "validate_call_request",
]

log = logging.getLogger("callbridge.server")

MAX_REQUEST_BYTES = 16 * 1024
_PHONE_RE = re.compile(r"^(\+[1-9][0-9]{6,15}|(sip|client):[A-Za-z0-9@._:;=+-]{1,200})$")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
NO_SUCH_SID = "no such call (a call SID is CA followed by 32 hex digits)"

Handler = Callable[[Request], Awaitable[Response]]


def state_of(request: Request) -> AppState:
    state: AppState = request.app.state.callbridge
    return state


def authorized(request: Request, expected: str) -> bool:
    header = request.headers.get("authorization", "")
    if not expected or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[7:].encode(), expected.encode())


def require_token(handler: Handler) -> Handler:
    """`handler` behind the bearer token (503 when the API has no token set)."""

    async def wrapped(request: Request) -> Response:
        expected = state_of(request).settings.api_token
        if not expected:
            return error(503, "the /calls API is disabled: CALLBRIDGE_API_TOKEN is not set")
        if not authorized(request, expected):
            return JSONResponse(
                {"error": "missing or wrong bearer token"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await handler(request)

    return wrapped


async def create_call(request: Request) -> Response:
    state = state_of(request)
    body = await read_body(request, MAX_REQUEST_BYTES)
    if body is None:
        return error(413, "request body too large")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # incl. an integer literal over 4300 digits
        return error(400, "body must be JSON")
    problem = validate_call_request(data)
    if problem:
        return error(422, problem)
    if not state.bridge.accepting or not state.has_capacity():
        return error(503, "at capacity: try again later")
    if state.fleet is not None and not await state.fleet.room():
        return error(503, "the fleet is at CALLBRIDGE_FLEET_MAX_CONCURRENT_CALLS: try again later")
    ref = state.tokens.outbound_ref()
    variables = {
        name: value if isinstance(value, str) else json.dumps(value)
        for name, value in (data.get("dynamic_variables") or {}).items()
    }
    params = stream_parameters(
        from_=data["from"],
        to=data["to"],
        direction="outbound",
        token_ref=ref,
        token=state.tokens.token(ref),
        agent_id=data.get("agent_id"),
        variables=variables,
    )
    try:
        settings = state.settings
        out = await state.control.place_call(
            data["to"],
            data["from"],
            settings.stream_url(),
            params,
            settings.public("/twilio/status"),
            **amd_arguments(settings, data.get("machine_detection", "off")),
        )
    except CallControlError as exc:
        log_event(log, "twilio.create_failed", logging.ERROR, to=data["to"], error=str(exc))
        return error(502, str(exc))
    state.tokens.bind(ref, out.call_sid)
    if state.fleet is not None:
        await state.fleet.placed(out.call_sid)
    state.expect_stream(out.call_sid, ExpectedCall("outbound", data["from"], data["to"]))
    # The call is placed: from here on, nothing may answer 5xx (a client that retries
    # would dial the person twice). The placeholder is queued; the API shows it at once.
    record = await state.store.create_placeholder(out.call_sid, "outbound", data["from"], data["to"])
    log_event(log, "call.outbound_created", call_sid=out.call_sid, to=data["to"])
    return JSONResponse(record, status_code=201)


async def list_calls(request: Request) -> Response:
    q = request.query_params
    try:
        limit = min(max(int(q.get("limit", "50")), 1), 200)
        offset = max(int(q.get("offset", "0")), 0)
        since = utc_time(q["since"]) if q.get("since") else None
        until = utc_time(q["until"]) if q.get("until") else None
    except ValueError:
        return error(400, "limit/offset must be integers and since/until ISO 8601 times")
    view = q.get("view", "full")
    if view not in ("full", "brief"):
        return error(400, "view must be full or brief")
    status = q.get("status")
    if status and status not in ("active", "ended"):
        return error(400, "status must be active or ended")
    reason = q.get("end_reason")
    if reason and reason not in {r.value for r in EndReason}:
        return error(400, f"unknown end_reason {reason!r}")
    page = await state_of(request).store.list_calls(
        status=status,
        end_reason=reason,
        since=since,
        until=until,
        limit=limit,
        offset=offset,
        brief=view == "brief",
    )
    return JSONResponse({"calls": page.items, "next_offset": page.next_offset})


def utc_time(text: str) -> datetime:
    """An ISO 8601 time as UTC (the records' times are UTC); one without an offset is UTC."""
    value = datetime.fromisoformat(text)
    return value.astimezone(UTC) if value.tzinfo is not None else value.replace(tzinfo=UTC)


async def get_call(request: Request) -> Response:
    call_sid = request.path_params["call_sid"]
    if not CALL_SID_RE.fullmatch(call_sid):
        return error(404, NO_SUCH_SID)
    record = await state_of(request).store.get(call_sid)
    if record is None:
        return error(404, "no such call")
    return JSONResponse(record)


async def hangup_call(request: Request) -> Response:
    state = state_of(request)
    call_sid = request.path_params["call_sid"]
    if not CALL_SID_RE.fullmatch(call_sid):
        return error(404, NO_SUCH_SID)
    live = await state.bridge.hangup(call_sid)
    if live is not None:
        return JSONResponse(await state.store.get(call_sid) or live.to_dict())
    # Held by another live instance: it ends the call through its own lifecycle.
    reply = await state.fleet.hangup_elsewhere(call_sid) if state.fleet is not None else None
    if reply is not None and reply.get("found"):
        shown = await state.store.get(call_sid) or {"call_sid": call_sid}
        shown.update(status=reply.get("status"), end_reason=reply.get("end_reason"))
        shown["ended_by_instance"] = reply.get("instance")
        return JSONResponse(shown)
    record = await state.store.get(call_sid)
    if record is None:
        return error(404, "no such call")
    if record["status"] == "ended":
        return error(409, "call already ended")
    # No live instance holds it (its holder is gone, or its stream has not connected):
    # end it at Twilio; an instance holding it sees the stream stop and records the end.
    try:
        await state.control.hangup(call_sid)
    except CallControlError as exc:
        return error(502, str(exc))
    return JSONResponse(record, status_code=202)


async def store_unavailable(request: Request, exc: Exception) -> Response:
    log_event(log, "api.store_unavailable", logging.WARNING, path=request.url.path, error=str(exc))
    return JSONResponse(
        {"error": "the call records database is unavailable; try again shortly"},
        status_code=503,
        headers={"Retry-After": "5"},
    )


def validate_call_request(data: Any) -> str | None:
    """Why a `POST /calls` body is unacceptable, or None."""
    if not isinstance(data, dict):
        return "body must be a JSON object"
    unknown = set(data) - {"to", "from", "dynamic_variables", "agent_id", "machine_detection"}
    if unknown:
        return f"unknown fields: {', '.join(sorted(map(str, unknown)))}"
    for key in ("to", "from"):
        value = data.get(key)
        if not isinstance(value, str) or not _PHONE_RE.fullmatch(value):
            return f"{key!r} must be an E.164 number (+15551234567) or a sip:/client: address"
    agent_id = data.get("agent_id")
    if agent_id is not None and (not isinstance(agent_id, str) or not AGENT_ID_RE.fullmatch(agent_id)):
        return "'agent_id' must be letters, digits, '_' or '-'"
    if data.get("machine_detection", "off") not in MACHINE_DETECTION_MODES:
        return "'machine_detection' must be one of: off, hangup, agent"
    variables = data.get("dynamic_variables")
    if variables is None:
        return None
    if not isinstance(variables, dict) or len(variables) > 32:
        return "'dynamic_variables' must be an object of at most 32 entries"
    for name, value in variables.items():
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            return f"dynamic variable name {name!r} must be an identifier"
        if not isinstance(value, str | int | float | bool) or value is None:
            return f"dynamic variable {name!r} must be a string, number or boolean"
        if len(str(value)) + len(name) > 400:
            return (
                f"dynamic variable {name!r} is too long (Twilio limits a stream parameter to 500 characters)"
            )
    return None
