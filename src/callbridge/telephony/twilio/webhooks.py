"""Twilio's side of the HTTP server: the routes Twilio calls, and what they speak.

- `POST /twilio/inbound` (the voice webhook): answers `<Connect><Stream>` TwiML
  (`twiml.connect_twiml`), or the busy TwiML (`<Say>` + `<Hangup/>`) when the
  server takes no more calls;
- `POST /twilio/status` (status callbacks);
- `WS /twilio/media-stream`: the upgrade's signature is checked, then the socket
  goes to the bridge: the server's own connection when it offers one (the
  `DIRECT_SOCKET` scope extension, server/wsroute.py), else `StarletteSocket`.

Every request is checked with the SDK's `RequestValidator` (`TwilioSignatures`)
against the URL Twilio signed: `CALLBRIDGE_PUBLIC_URL` + path + query for the
webhooks, the `wss://` stream URL with no parameters for the upgrade (a bad one is
accepted, then closed 1008). Form bodies are read with a size limit (`read_form`).

This is the Twilio HTTP adapter: the one module of `telephony/twilio` that knows
Starlette. It decides nothing about calls: what to answer, what a status means for
the records and how a stream is taken belong to the server that mounts the routes,
found on `app.state.callbridge` and seen here only as a `TwilioHost`. (This package
never imports `callbridge.server`.)
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import parse_qsl

from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.websockets import WebSocket, WebSocketDisconnect
from twilio.request_validator import RequestValidator

from callbridge.logs import log_event
from callbridge.telephony.twilio.twiml import connect_twiml
from callbridge.transport import DIRECT_SOCKET, DirectSocket, MessageSocket, SocketClosed

__all__ = [
    "BUSY_TWIML",
    "CALL_SID_RE",
    "MAX_BODY_BYTES",
    "StarletteSocket",
    "TwilioHost",
    "TwilioSignatures",
    "inbound",
    "media_stream",
    "read_body",
    "read_form",
    "signed_url",
    "status_callback",
]

# The server's logger: these are the server's routes, and their log lines keep its name.
log = logging.getLogger("callbridge.server")

MAX_BODY_BYTES = 64 * 1024
BUSY_TWIML = (
    '<?xml version="1.0" encoding="UTF-8"?><Response><Say>Sorry, all of our lines are busy right now. '
    "Please call again in a few minutes.</Say><Hangup/></Response>"
)
CALL_SID_RE = re.compile(r"^CA[0-9a-fA-F]{32}$")
MEDIA_STREAM_PATH = "/twilio/media-stream"


# -- TwiML (`<Connect><Stream>` is built in twiml.py) --------------------------------------


def twiml_response(twiml: str) -> Response:
    return Response(twiml, media_type="application/xml")


# -- request bodies -----------------------------------------------------------------------


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes | None:
    """The body, or None if it is larger than `limit` (checked while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def read_form(request: Request) -> dict[str, str] | Response:
    """A webhook's form fields, or the 413 / 400 answer to give instead."""
    body = await read_body(request)
    if body is None:
        return error(413, "request body too large")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        return error(400, "form body is not UTF-8")
    return dict(pairs)


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


# -- signatures ---------------------------------------------------------------------------


def signed_url(conn: HTTPConnection, root: str) -> str:
    """The URL Twilio signed: `root` (the public URL, whatever a proxy rewrote) plus the
    path and query it requested."""
    url = root + conn.url.path
    if conn.url.query:
        url += "?" + conn.url.query
    return url


class TwilioSignatures:
    """`X-Twilio-Signature` checks (the SDK's `RequestValidator`), and how many requests
    each route refused for a bad one."""

    # A refusal is logged at once, then at most once per this many seconds per route (with
    # how many were not logged): a misconfigured number must not flood the log.
    LOG_INTERVAL = 10.0

    def __init__(self, auth_token: str) -> None:
        self._validator = RequestValidator(auth_token)
        self.rejected: dict[str, int] = {}  # by route, for /metrics
        self._logged: dict[str, tuple[float, int]] = {}  # route -> (last logged, refusals since)

    def valid(self, url: str, params: Mapping[str, str], signature: str | None) -> bool:
        if not signature:
            return False
        return bool(self._validator.validate(url, dict(params), signature))

    def refused(self, route: str, url: str | None = None, signature: str | None = None) -> None:
        """Count a refusal and say, rate-limited, which URL was validated and what must match
        (never the token, never the signature itself)."""
        self.rejected[route] = self.rejected.get(route, 0) + 1
        now = time.monotonic()
        last, unlogged = self._logged.get(route, (None, 0))
        if last is not None and now - last < self.LOG_INTERVAL:
            self._logged[route] = (last, unlogged + 1)
            return
        self._logged[route] = (now, 0)
        shown = url.split("?", 1)[0] if url else None
        if not signature:
            hint = "no X-Twilio-Signature header: is this request from Twilio?"
        elif route == MEDIA_STREAM_PATH:
            hint = (
                "Twilio signs the stream URL callbridge answered with (the wss:// form of "
                "CALLBRIDGE_PUBLIC_URL): a proxy must pass its host and path unchanged, and "
                "TWILIO_AUTH_TOKEN must be the token of the account that owns the number"
            )
        else:
            hint = (
                "the URL set on the Twilio number (console, or `callbridge numbers connect`) must be "
                "exactly CALLBRIDGE_PUBLIC_URL + this path: same scheme, host and path, no port "
                "behind a proxy; and TWILIO_AUTH_TOKEN must be the token of the account that owns "
                "the number"
            )
        log_event(
            log,
            "twilio.bad_signature",
            logging.WARNING,
            route=route,
            validated_url=shown,
            hint=hint,
            not_logged_since_last=unlogged or None,
        )


# -- the server behind the routes ---------------------------------------------------------


class TwilioHost(Protocol):
    """What the Twilio routes need of the server that mounts them (`app.state.callbridge`)."""

    @property
    def signatures(self) -> TwilioSignatures: ...

    @property
    def public_url(self) -> str | None: ...

    @property
    def stream_url(self) -> str:
        """The `wss://` URL of `<Stream>`: what Twilio signs when it opens the stream."""
        ...

    @property
    def accepting(self) -> bool:
        """False while the server drains: media streams are refused (1013)."""
        ...

    async def answer_call(self, call_sid: str, direction: str, from_: str, to: str) -> dict[str, str] | None:
        """The `<Parameter>`s of the stream a new call is answered with, or None: busy."""
        ...

    async def call_status(
        self, call_sid: str, status: str, details: dict[str, Any], form: dict[str, str]
    ) -> None:
        """A verified status callback (`details`: duration, timestamp, sequence number)."""
        ...

    async def take_stream(self, socket: MessageSocket) -> None:
        """Run the call of a verified media-stream connection, until it ends."""
        ...


def host_of(conn: HTTPConnection) -> TwilioHost:
    host: TwilioHost = conn.app.state.callbridge
    return host


def verified(request: Request, host: TwilioHost, form: Mapping[str, str]) -> bool:
    """Whether a webhook or status callback is signed by Twilio; a refusal is counted."""
    url = signed_url(request, (host.public_url or "").rstrip("/"))
    if host.signatures.valid(url, form, request.headers.get("x-twilio-signature")):
        return True
    host.signatures.refused(request.url.path, url, request.headers.get("x-twilio-signature"))
    return False


async def signed_form(request: Request, host: TwilioHost) -> dict[str, str] | Response:
    """The form of a Twilio request, or the error answer: too large, not UTF-8, unsigned."""
    form = await read_form(request)
    if isinstance(form, Response):
        return form
    if not verified(request, host, form):
        return error(403, "invalid Twilio signature")
    return form


# -- routes -------------------------------------------------------------------------------


async def voice_webhook(request: Request, direction: str) -> Response:
    host = host_of(request)
    form = await signed_form(request, host)
    if isinstance(form, Response):
        return form
    call_sid = form.get("CallSid", "")
    if not CALL_SID_RE.fullmatch(call_sid):
        return error(400, "CallSid missing or malformed")
    params = await host.answer_call(call_sid, direction, form.get("From", ""), form.get("To", ""))
    if params is None:
        return twiml_response(BUSY_TWIML)
    log_event(log, "twilio.webhook", call_sid=call_sid, direction=direction)
    return twiml_response(connect_twiml(host.stream_url, params))


async def inbound(request: Request) -> Response:
    return await voice_webhook(request, "inbound")


async def status_callback(request: Request) -> Response:
    host = host_of(request)
    form = await signed_form(request, host)
    if isinstance(form, Response):
        return form
    call_sid, status = form.get("CallSid", ""), form.get("CallStatus", "")
    if not CALL_SID_RE.fullmatch(call_sid) or not status:
        return error(400, "CallSid and CallStatus are required")
    details: dict[str, Any] = {
        k: form[k] for k in ("CallDuration", "Timestamp", "SequenceNumber") if k in form
    }
    log_event(log, "twilio.status", call_sid=call_sid, status=status)
    await host.call_status(call_sid, status, details, form)
    return Response(status_code=204)


async def media_stream(ws: WebSocket) -> None:
    host = host_of(ws)
    url = signed_url(ws, host.stream_url.rsplit(MEDIA_STREAM_PATH, 1)[0])
    signature = ws.headers.get("x-twilio-signature")
    socket: MessageSocket
    direct: DirectSocket | None = ws.scope.get("extensions", {}).get(DIRECT_SOCKET)
    if direct is not None:  # the server's own connection (server/wsroute.py): no ASGI messages
        direct.accept()
        socket = direct
    else:
        await ws.accept()
        socket = StarletteSocket(ws)
    if not host.signatures.valid(url, {}, signature):
        host.signatures.refused(MEDIA_STREAM_PATH, url, signature)
        await socket.close(1008, "invalid signature")
        return
    if not host.accepting:
        await socket.close(1013, "shutting down")
        return
    await host.take_stream(socket)


class StarletteSocket:
    """`MessageSocket` over a Starlette WebSocket (uvicorn)."""

    def __init__(self, ws: WebSocket) -> None:
        self._ws = ws
        self._closed = False

    async def receive(self) -> str | bytes:
        if self._closed:
            raise SocketClosed(1000, "closed")
        message = await self._ws.receive()
        kind = message["type"]
        if kind == "websocket.receive":
            text = message.get("text")
            if text is not None:
                return str(text)
            return bytes(message.get("bytes") or b"")
        self._closed = True
        code = int(message.get("code", 1005))
        # uvicorn reports a connection lost without a close frame as 1006.
        raise SocketClosed(None if code == 1006 else code, str(message.get("reason") or ""))

    async def send(self, text: str) -> None:
        if self._closed:
            raise SocketClosed(1000, "closed")
        try:
            await self._ws.send({"type": "websocket.send", "text": text})
        except (WebSocketDisconnect, RuntimeError, OSError) as exc:
            self._closed = True
            raise SocketClosed(None, repr(exc)) from None

    async def send_many(self, texts: Sequence[str]) -> None:
        for text in texts:
            await self.send(text)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            await self._ws.close(code, reason)
