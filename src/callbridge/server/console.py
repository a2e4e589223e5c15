"""The web console under `/ui/`: static files shipped in the package, the headers a console
needs, the live feed of calls (a WebSocket) and the "at a glance" counts.

- **Static files** (`server/ui/`: index.html, app.js, app.css; no build step) are served from a
  fixed list, each with a Content-Security-Policy allowing only this origin's own script,
  style and connections (no inline script or style, no third party), no framing
  (`frame-ancestors 'none'`, `X-Frame-Options: DENY`), `nosniff` and no referrer.
- **Live feed** (`WS /ui/api/live`): the browser sends the API token as its first message
  (never in a URL, which proxies log). The feed then samples the bridge's live calls, the
  same `Call` objects whose records are stored and whose counters feed /metrics, every
  `FEED_INTERVAL` seconds and sends one message with the calls that changed since its last
  message (and those that ended), so 200 live calls cost one message per interval, not one
  per audio frame. Nothing runs on a call's audio path: the call is only read. A client may
  `watch` one call: it then also gets that call's new transcript lines and timeline events.
- **At a glance** (`GET /ui/api/summary`): calls per minute and end reasons over the last
  hour, counted by the database (`CallStore.summary`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from callbridge.bridge import Bridge
from callbridge.call import Call, EndReason
from callbridge.logs import log_event
from callbridge.server.api import require_token, state_of
from callbridge.telephony.twilio.webhooks import CALL_SID_RE

__all__ = ["FEED_INTERVAL", "SECURITY_HEADERS", "LiveFeed", "routes"]

log = logging.getLogger("callbridge.console")

UI_DIR = Path(__file__).parent / "ui"
# The files the console is made of, and their types: nothing else under /ui/ is served.
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'{sockets}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# A host as a browser may name it in `Host` (name or address, optional port): anything else is
# left out of the policy rather than echoed into a header.
HOST_RE = re.compile(r"^[A-Za-z0-9.\-]{1,253}(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?$")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP.format(sockets=""),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
# How often the live feed samples the calls and sends what changed (seconds).
FEED_INTERVAL = 0.3
# The first message (the token) must come within this long.
TOKEN_WAIT_S = 10.0
# A watched call's last transcript lines are re-sent when they change: an interrupted agent
# line is corrected in place (what the caller actually heard).
RESEND_TAIL = 3
SUMMARY_WINDOW = timedelta(hours=1)


# -- static files -------------------------------------------------------------------------


async def ui_redirect(request: Request) -> Response:
    return RedirectResponse("/ui/", status_code=308, headers=SECURITY_HEADERS)


def headers_for(request: Request) -> dict[str, str]:
    """The security headers; the policy also names this host's ws:// and wss:// origins (CSP
    level 3 counts them as 'self', but not every browser does yet)."""
    host = request.headers.get("host", "")
    if not HOST_RE.fullmatch(host):
        return SECURITY_HEADERS
    return SECURITY_HEADERS | {"Content-Security-Policy": CSP.format(sockets=f" ws://{host} wss://{host}")}


async def ui_file(request: Request) -> Response:
    name = request.path_params.get("name") or "index.html"
    media_type = FILES.get(name)
    if media_type is None:
        return JSONResponse({"error": "not found"}, status_code=404, headers=SECURITY_HEADERS)
    return FileResponse(UI_DIR / name, media_type=media_type, headers=headers_for(request))


# -- at a glance --------------------------------------------------------------------------


async def summary(request: Request) -> Response:
    state = state_of(request)
    since = datetime.now(UTC) - SUMMARY_WINDOW
    counts = await state.store.summary(since)
    counts["live_here"] = state.bridge.live_calls
    counts["window_s"] = int(SUMMARY_WINDOW.total_seconds())
    counts["known_end_reasons"] = [reason.value for reason in EndReason]
    return JSONResponse(counts)


# -- live feed ----------------------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def call_summary(call: Call) -> dict[str, Any]:
    """What the list of live calls shows of one call (read from the call, never changed)."""
    rec = call.record
    last = rec.transcript[-1] if rec.transcript else None
    return {
        "call_sid": call.call_sid,
        "from": rec.from_number,
        "to": rec.to_number,
        "direction": rec.direction,
        "state": call.state.value,
        "started_at": _iso(rec.started_at),
        # The agent speaks while audio it sent has not been played to the caller yet (its
        # marks are pending); otherwise the line is the caller's.
        "speaking": "agent" if call.telephony.is_open and call.telephony.pending_marks else "caller",
        "lines": len(rec.transcript),
        "last_line": {"role": last.get("role"), "text": last.get("text")} if last else None,
        "end_reason": call.end_reason.value if call.end_reason is not None else None,
    }


@dataclass
class Sample:
    at: float
    calls: dict[str, tuple[Call, dict[str, Any]]]


class LiveFeed:
    """Samples the bridge's live calls at most once per `interval` (shared by every console)."""

    def __init__(self, bridge: Bridge, interval: float = FEED_INTERVAL) -> None:
        self.bridge = bridge
        self.interval = interval
        self._sample = Sample(float("-inf"), {})

    def sample(self) -> Sample:
        now = time.monotonic()
        if now - self._sample.at >= self.interval / 2:
            calls: dict[str, tuple[Call, dict[str, Any]]] = {}
            for key, call in list(self.bridge.calls.items()):
                if call.call_sid is not None and key == call.call_sid:
                    calls[key] = (call, call_summary(call))
            self._sample = Sample(now, calls)
        return self._sample


@dataclass
class Watch:
    """One call a console follows in detail: how much of it was sent."""

    call_sid: str
    lines: int = 0
    tail: list[Any] = field(default_factory=list)
    events: int = 0


class Subscriber:
    """One console's connection: what it was sent, so each message is only what changed."""

    def __init__(self, ws: WebSocket, feed: LiveFeed) -> None:
        self.ws = ws
        self.feed = feed
        self.sent: dict[str, dict[str, Any]] = {}
        self.calls: dict[str, Call] = {}
        self.watch: Watch | None = None

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_text(json.dumps(message, default=str))

    def changes(self) -> dict[str, Any] | None:
        sample = self.feed.sample()
        changed = [s for sid, (_, s) in sample.calls.items() if self.sent.get(sid) != s]
        ended = []
        for sid in [sid for sid in self.sent if sid not in sample.calls]:
            call = self.calls.pop(sid)
            del self.sent[sid]
            reason = call.end_reason.value if call.end_reason is not None else None
            ended.append({"call_sid": sid, "end_reason": reason})
        for sid, (call, s) in sample.calls.items():
            self.sent[sid], self.calls[sid] = s, call
        message: dict[str, Any] = {}
        if changed or ended:
            message.update(calls=changed, ended=ended)
        detail = self.watched(sample)
        if detail is not None:
            message["watched"] = detail
        return message or None

    def watched(self, sample: Sample) -> dict[str, Any] | None:
        w = self.watch
        if w is None:
            return None
        found = sample.calls.get(w.call_sid)
        if found is None:
            self.watch = None  # over (or never live here): the console reads the record
            return {"call_sid": w.call_sid, "live": False}
        rec = found[0].record
        lines, events = rec.transcript, rec.timeline
        start = max(0, min(w.lines, len(lines) - RESEND_TAIL))
        tail = [dict(x) for x in lines[start:]]
        if len(lines) == w.lines and len(events) == w.events and tail == w.tail:
            return None
        out = {
            "call_sid": w.call_sid,
            "live": True,
            "transcript_from": start,
            "transcript": tail,
            "timeline_from": w.events,
            "timeline": [dict(e) for e in events[w.events :]],
        }
        w.lines, w.events, w.tail = len(lines), len(events), tail
        return out

    async def run(self) -> None:
        while True:
            message = self.changes()
            if message is not None:
                message["type"] = "update"
                await self.send(message)
            await asyncio.sleep(self.feed.interval)

    async def listen(self) -> None:
        """The console's requests: `{"watch": "CA..."}` or `{"watch": null}`."""
        while True:
            text = await receive_text(self.ws)
            try:
                request = json.loads(text) if text is not None else None
            except (ValueError, RecursionError):
                request = None
            if not isinstance(request, dict) or "watch" not in request:
                await self.send({"type": "error", "error": 'expected {"watch": "<call SID>" | null}'})
                continue
            sid = request["watch"]
            if sid is None:
                self.watch = None
            elif isinstance(sid, str) and CALL_SID_RE.fullmatch(sid):
                self.watch = Watch(sid)
            else:
                await self.send({"type": "error", "error": "watch: not a call SID"})


async def receive_text(ws: WebSocket) -> str | None:
    """The next text message (None for a binary one); `WebSocketDisconnect` when closed."""
    message = await ws.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    text = message.get("text")
    return text if isinstance(text, str) else None


def token_ok(given: Any, expected: str) -> bool:
    return isinstance(given, str) and hmac.compare_digest(given.encode(), expected.encode())


async def live(ws: WebSocket) -> None:
    state = ws.app.state.callbridge
    expected: str = state.settings.api_token
    feed: LiveFeed = ws.app.state.console_feed
    await ws.accept()
    try:
        if not expected:
            await ws.send_text(json.dumps({"type": "error", "error": "CALLBRIDGE_API_TOKEN is not set"}))
            await ws.close(1008, "console disabled")
            return
        try:
            async with asyncio.timeout(TOKEN_WAIT_S):
                text = await receive_text(ws)
            first = json.loads(text) if text is not None else None
        except (TimeoutError, ValueError, RecursionError):
            first = None
        if not isinstance(first, dict) or not token_ok(first.get("token"), expected):
            log_event(log, "console.refused", logging.WARNING, client=ws.client.host if ws.client else None)
            await ws.send_text(json.dumps({"type": "error", "error": "missing or wrong token"}))
            await ws.close(1008, "missing or wrong token")
            return
        sub = Subscriber(ws, feed)
        await sub.send({"type": "hello", "interval_s": feed.interval})
        sender = asyncio.ensure_future(sub.run())
        reader = asyncio.ensure_future(sub.listen())
        try:
            done, _ = await asyncio.wait({sender, reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, reader):
                task.cancel()
            await asyncio.gather(sender, reader, return_exceptions=True)
        for task in done:
            exc = task.exception()
            if exc is not None and not isinstance(exc, WebSocketDisconnect | RuntimeError | OSError):
                log.error("console feed failed: %r", exc, exc_info=exc)
    except WebSocketDisconnect:
        return
    finally:
        with contextlib.suppress(Exception):
            await ws.close()


def routes() -> list[BaseRoute]:
    """The console's routes (added to the app by `create_app`)."""
    return [
        Route("/ui", ui_redirect, methods=["GET"]),
        Route("/ui/", ui_file, methods=["GET"]),
        Route("/ui/{name}", ui_file, methods=["GET"]),
        Route("/ui/api/summary", require_token(summary), methods=["GET"]),
        WebSocketRoute("/ui/api/live", live),
    ]
