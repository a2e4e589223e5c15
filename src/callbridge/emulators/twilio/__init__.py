"""A local stand-in for Twilio: the REST Calls API and Twilio's side of Media Streams.

Built from Twilio's public documentation (``/work/shared/specs/twilio``) and the shapes of the
public REST resources, never from callbridge's own Twilio code: an emulator that shared the
bridge's parser would share its misunderstandings, and the tests would not see them.  For the
same reason it does not use the ``twilio`` SDK; signatures are computed here with hmac/hashlib.

What it does:

* a real ASGI server (Starlette on an in-process uvicorn, loopback only) serving
  ``/2010-04-01/Accounts/{AccountSid}/Calls.json`` and ``.../Calls/{CallSid}.json`` with HTTP
  Basic auth, form-encoded requests and JSON Call resources that the official SDK parses, and
  scripted faults (status codes, Twilio error codes, Retry-After, late answers);
* calls with Twilio's lifecycle (queued, ringing, in-progress, completed, ...), a small TwiML
  interpreter (``<Connect><Stream>``, ``<Say>``, ``<Play>``, ``<Pause>``, ``<Dial>``,
  ``<Hangup>``, ``<Reject>``, ``<Redirect>``), signed voice webhooks and status callbacks;
* :class:`MediaStreamCaller`, Twilio as the WebSocket client of a bidirectional stream: it sends
  ``connected``/``start``/real-time paced ``media``, plays the server's audio at 8000 bytes/s,
  echoes ``mark`` when the audio before it has played, honours ``clear``, and ends the stream the
  way Twilio does (``stop`` then close) when the call ends;
* a media stream that never connects (``stream_upgrade_fault``): the WebSocket upgrade goes
  through a loopback "proxy" that drops it (``"drop"``: the connection is closed as soon as
  the upgrade request arrives) or never answers it (``"hang"``: held open until Twilio's
  ``stream_open_timeout``, or until the call ends).  The application never sees the stream.
  Twilio then goes on with the TwiML after ``<Connect>`` ("Twilio executes the remaining TwiML
  instructions only after your server closes the WebSocket connection"); with none left, the
  call completes.  How long real Twilio waits for an unanswered upgrade is not in the specs.

All times recorded for assertions are the event loop's clock (``loop.time()``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import email.utils
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import secrets
import socket
import uuid
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

__all__ = [
    "DEFAULT_ACCOUNT_SID",
    "EmulatedCall",
    "MediaStreamCaller",
    "RecordedRequest",
    "TwilioEmulator",
    "twilio_signature",
]

log = logging.getLogger(__name__)

DEFAULT_ACCOUNT_SID = "AC" + "0" * 32
API_VERSION = "2010-04-01"

FRAME_BYTES = 160  # 20 ms of mu-law at 8 kHz, the size of Twilio's inbound media frames
FRAME_SECONDS = 0.02
BYTES_PER_SECOND = 8000
MULAW_SILENCE = 0xFF

TERMINAL_STATUSES = frozenset({"completed", "busy", "failed", "no-answer", "canceled"})
# StatusCallbackEvent names by the call status that triggers them.
_EVENT_OF_STATUS = {
    "queued": "initiated",
    "ringing": "ringing",
    "in-progress": "answered",
    **{status: "completed" for status in TERMINAL_STATUSES},
}
# end_cause of a call whose <Connect><Stream> ended without Twilio ending it, by MediaStreamCaller.closed_by.
_CAUSE_OF_STREAM_END = {
    "server": "stream_closed",
    "drop": "stream_dropped",
    "connect_failed": "stream_connect_failed",
    "twilio": "stream_closed_by_twilio",  # close_without_stop(): a Twilio-side close, not a hang-up
}


# --------------------------------------------------------------------------------------------- helpers


def twilio_signature(
    auth_token: str, url: str, params: Mapping[str, str] | Iterable[tuple[str, str]] | None = None
) -> str:
    """X-Twilio-Signature: base64(HMAC-SHA1(auth token, url + sorted params as key+value))."""
    items = list(params.items()) if isinstance(params, Mapping) else list(params or ())
    payload = url + "".join(key + value for key, value in sorted(items))
    digest = hmac.new(auth_token.encode("utf-8"), payload.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def new_sid(prefix: str) -> str:
    """A Twilio-shaped SID: two-letter prefix and 32 lowercase hex digits."""
    return prefix + secrets.token_hex(16)


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _rfc2822(value: datetime | None) -> str | None:
    # Twilio's REST dates look like "Tue, 31 Aug 2010 20:36:28 +0000".
    return email.utils.format_datetime(value) if value is not None else None


def _format_number(number: str) -> str:
    # Twilio's *_formatted fields show NANP numbers as "(415) 555-1212", others as given.
    digits = number[2:] if number.startswith("+1") else ""
    if len(digits) == 10 and digits.isdigit():
        return f"({digits[:3]}) {digits[3:6]}-{digits[6:]}"
    return number


def _is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _require_loopback_url(url: str) -> None:
    if not _is_loopback_host(urlsplit(url).hostname):
        raise ValueError(f"the Twilio emulator only talks to loopback addresses, not {url!r}")


def _error_body(status: int, code: int, message: str) -> dict[str, Any]:
    return {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


_DEFAULT_ERROR_CODES = {400: 20001, 401: 20003, 403: 20403, 404: 20404, 405: 20004, 429: 20429}
_DEFAULT_ERROR_MESSAGES = {
    20404: "The requested resource was not found",
    20429: "Too Many Requests",
    20500: "An internal server error has occurred",
    20503: "Service unavailable",
    21220: "Call is not in-progress. Cannot redirect.",
}


async def _cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    if task is None or task is asyncio.current_task():
        return
    if not task.done():
        task.cancel()
        # asyncio.wait neither raises the task's error nor swallows our own cancellation.
        await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it as never retrieved


@dataclass
class RecordedRequest:
    """One request the REST API received (form holds the last value of each field)."""

    time: float
    method: str
    path: str
    form: dict[str, str]
    headers: dict[str, str]
    items: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class WebhookRecord:
    """One HTTP request the emulator made to the application (voice webhook or status callback)."""

    time: float
    kind: str  # "voice" | "status"
    call_sid: str
    method: str
    url: str
    params: dict[str, str]
    signature: str | None
    status_code: int | None
    body: str = ""
    error: str | None = None


@dataclass
class _Fault:
    status: int | None
    code: int | None
    message: str | None
    retry_after: float | None
    delay: float


@dataclass
class _PendingMark:
    name: str


# --------------------------------------------------------------------------------------------- media stream


class MediaStreamCaller:
    """Twilio's side of one bidirectional media stream: a WebSocket client on loopback.

    It can be used on its own (``async with MediaStreamCaller(url, ...) as caller``), but it is
    normally created by :class:`TwilioEmulator` when a call runs ``<Connect><Stream>``.
    """

    def __init__(
        self,
        url: str,
        *,
        account_sid: str = DEFAULT_ACCOUNT_SID,
        auth_token: str | None = None,
        call_sid: str | None = None,
        audio: bytes = b"",
        custom_parameters: Mapping[str, str] | None = None,
        signature: str | None = None,
        sign: bool = True,
        open_timeout: float = 5.0,
        close_timeout: float = 2.0,
        record_media: bool = True,
        frame_interval: float = FRAME_SECONDS,
        connect_to: tuple[str, int] | None = None,
    ) -> None:
        self.url = url
        # Where the TCP connection really goes (a proxy in front of the application), if not
        # to the URL's host and port; the upgrade request still names the URL.
        self.connect_to = connect_to
        self.account_sid = account_sid
        self.call_sid = call_sid or new_sid("CA")
        self.stream_sid = new_sid("MZ")
        self.custom_parameters = dict(custom_parameters or {})
        # Twilio signs the upgrade over the exact wss URL with no parameters.
        if signature is None and sign and auth_token is not None:
            signature = twilio_signature(auth_token, url)
        self.signature = signature
        self.open_timeout = open_timeout
        self.close_timeout = close_timeout
        # Long or many calls (benchmarks) can skip keeping every media message in sent/received.
        self.record_media = record_media
        # Seconds between media frames. Twilio sends one every 20 ms; a soak of hundreds of calls
        # on a small machine may send them less often (each frame still carries 20 ms of audio).
        self.frame_interval = frame_interval

        # What happened, for assertions.
        self.sent: list[tuple[float, dict[str, Any]]] = []
        self.sent_raw: list[tuple[float, str | bytes]] = []
        self.received: list[tuple[float, dict[str, Any] | str | bytes]] = []
        self.invalid: list[tuple[float, str]] = []
        self.media_frames_sent = 0
        self.media_messages_received = 0
        self.played_audio = bytearray()
        self.cleared_audio_bytes = 0
        self.marks_echoed: list[tuple[float, str, bool]] = []
        self.clears: list[float] = []
        self.connected_at: float | None = None
        self.media_started_at: float | None = None
        self.last_audio_played_at: float | None = None
        self.last_mark_played_at: float | None = None
        self.closed_at: float | None = None
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.closed_by: str | None = None  # "twilio" | "server" | "drop" | "connect_failed"
        self.connect_error: str | None = None
        self.hung_up = False

        self.started = asyncio.Event()  # `start` was sent
        self.closed = asyncio.Event()
        self.finished_sending = asyncio.Event()  # Twilio will send nothing more (stop sent, or socket gone)
        self.speech_done = asyncio.Event()  # the queued caller speech has all been sent

        # Hooks for the emulator's call; called synchronously.
        self.on_closed: Callable[[MediaStreamCaller], None] | None = None
        self.on_hangup: Callable[[MediaStreamCaller], None] | None = None

        self._progress_waiters: list[asyncio.Future[None]] = []
        self._speech = bytearray(audio)
        if not audio:
            self.speech_done.set()
        self._ws: ClientConnection | None = None
        self._seq = 0
        self._send_lock = asyncio.Lock()
        self._no_more_sends = False
        self._closing_by: str | None = None
        self._playback: deque[bytes | _PendingMark] = deque()
        self._playback_wake = asyncio.Event()
        self._clear_interrupt = asyncio.Event()
        self._playback_generation = 0
        self._current_frame = b""
        self._receive_task: asyncio.Task[None] | None = None
        self._media_task: asyncio.Task[None] | None = None
        self._playback_task: asyncio.Task[None] | None = None

    # ---- lifecycle

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    @property
    def is_open(self) -> bool:
        return self._ws is not None and not self.closed.is_set()

    async def connect(self) -> bool:
        """Open the socket, send ``connected`` and ``start``, then stream; False if it could not connect."""
        if self._ws is not None or self.closed.is_set():
            raise RuntimeError("a MediaStreamCaller connects once")
        loop = asyncio.get_running_loop()
        headers = {"x-twilio-signature": self.signature} if self.signature is not None else {}
        route: dict[str, Any] = {}
        if self.connect_to is not None:
            route = {"host": self.connect_to[0], "port": self.connect_to[1]}
        try:
            _require_loopback_url(self.url)
            if self.connect_to is not None and not _is_loopback_host(self.connect_to[0]):
                raise ValueError(f"the Twilio emulator only talks to loopback, not {self.connect_to}")
            self._ws = await connect(
                self.url,
                additional_headers=headers,
                user_agent_header="Twilio.TmeWs/1.0",
                open_timeout=self.open_timeout,
                close_timeout=self.close_timeout,
                ping_interval=None,
                compression=None,
                max_size=None,
                proxy=None,
                **route,
            )
        except (OSError, WebSocketException, TimeoutError, ValueError) as exc:
            self.connect_error = f"{type(exc).__name__}: {exc}"
            self._mark_closed("connect_failed")
            return False
        except asyncio.CancelledError:
            self.connect_error = "cancelled"
            self._mark_closed("connect_failed")
            raise
        self.connected_at = loop.time()
        try:
            await self._send_unnumbered({"event": "connected", "protocol": "Call", "version": "1.0.0"})
            await self._send(
                {
                    "event": "start",
                    "start": {
                        "accountSid": self.account_sid,
                        "streamSid": self.stream_sid,
                        "callSid": self.call_sid,
                        "tracks": ["inbound"],
                        "customParameters": dict(self.custom_parameters),
                        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                    },
                    "streamSid": self.stream_sid,
                }
            )
        except ConnectionClosed:
            pass
        self.started.set()
        self._receive_task = asyncio.create_task(
            self._receive_loop(), name=f"twilio-emu-recv-{self.stream_sid}"
        )
        self._media_task = asyncio.create_task(self._media_loop(), name=f"twilio-emu-media-{self.stream_sid}")
        self._playback_task = asyncio.create_task(
            self._playback_loop(), name=f"twilio-emu-playback-{self.stream_sid}"
        )
        return True

    async def aclose(self) -> None:
        """End the stream as Twilio does (stop, close) if still open, and leave no task behind."""
        if self.is_open:
            with contextlib.suppress(TimeoutError, ConnectionClosed):
                async with asyncio.timeout(self.close_timeout + 1.0):
                    await self.end_stream(send_stop=True)
        if self._ws is not None and not self.closed.is_set():
            self._ws.transport.abort()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self.closed.wait()
        for task in (self._media_task, self._playback_task, self._receive_task):
            await _cancel_and_wait(task)
        if not self.closed.is_set():
            self._mark_closed(self._closing_by or "twilio")

    async def wait_closed(self, timeout: float | None = None) -> None:
        async with asyncio.timeout(timeout):
            await self.closed.wait()

    # ---- what the caller (or Twilio) does

    async def end_stream(self, *, send_stop: bool = True, closed_by: str = "twilio") -> None:
        """Twilio ends the stream: no more media, ``stop`` (unless told not to), close frame 1000."""
        ws = self._ws
        if ws is None or self.closed.is_set():
            return
        if self._closing_by is not None:
            await self.closed.wait()
            return
        self._closing_by = closed_by
        await _cancel_and_wait(self._media_task)
        if send_stop:
            with contextlib.suppress(ConnectionClosed):
                await self._send(
                    {
                        "event": "stop",
                        "stop": {"accountSid": self.account_sid, "callSid": self.call_sid},
                        "streamSid": self.stream_sid,
                    },
                    last=True,
                )
        self._no_more_sends = True
        self.finished_sending.set()
        await ws.close(1000)
        await self.closed.wait()

    async def hangup(self) -> None:
        """The caller hangs up: the call completes, Twilio sends ``stop`` and closes the socket."""
        if not self.is_open:
            return
        self.hung_up = True
        if self.on_hangup is not None:
            self.on_hangup(self)
        await self.end_stream(send_stop=True)

    async def close_without_stop(self) -> None:
        """Close the socket cleanly (1000) without sending ``stop`` first."""
        await self.end_stream(send_stop=False)

    async def drop(self) -> None:
        """The network drops: the TCP connection is aborted, no close frame."""
        ws = self._ws
        if ws is None or self.closed.is_set() or self._closing_by is not None:
            return
        self._closing_by = "drop"
        await _cancel_and_wait(self._media_task)
        self._no_more_sends = True
        ws.transport.abort()
        await self.closed.wait()

    async def send_raw(self, data: str | bytes) -> None:
        """Send anything as-is (for protocol-robustness tests); not numbered, not in ``sent``."""
        if self._ws is None:
            raise RuntimeError("not connected")
        async with self._send_lock:
            await self._ws.send(data)
            self.sent_raw.append((asyncio.get_running_loop().time(), data))

    async def send_dtmf(self, digit: str) -> None:
        await self._send(
            {
                "event": "dtmf",
                "streamSid": self.stream_sid,
                "dtmf": {"track": "inbound_track", "digit": digit},
            }
        )

    def set_audio(self, audio: bytes) -> None:
        """Replace the caller speech still to be sent (silence follows when it runs out)."""
        self._speech = bytearray(audio)
        if audio:
            self.speech_done.clear()
        else:
            self.speech_done.set()

    def say(self, audio: bytes) -> None:
        """Queue more caller speech after what is still pending."""
        if audio:
            self._speech += audio
            self.speech_done.clear()

    # ---- views for assertions

    @property
    def buffered_audio_bytes(self) -> int:
        """Outbound audio received but not yet played."""
        queued = sum(len(item) for item in self._playback if isinstance(item, bytes))
        return queued + len(self._current_frame)

    def received_events(self, event: str) -> list[dict[str, Any]]:
        return [msg for _, msg in self.received if isinstance(msg, dict) and msg.get("event") == event]

    def sent_events(self, event: str) -> list[dict[str, Any]]:
        return [msg for _, msg in self.sent if msg.get("event") == event]

    async def wait_until(self, predicate: Callable[[], bool], timeout: float | None = None) -> None:
        """Wait until ``predicate()`` holds; re-checked after every message in or out and at close."""
        async with asyncio.timeout(timeout):
            while not predicate():
                if self.closed.is_set():
                    raise ConnectionError("stream closed before the condition held")
                future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._progress_waiters.append(future)
                try:
                    await future
                finally:
                    with contextlib.suppress(ValueError):
                        self._progress_waiters.remove(future)

    async def wait_for_mark(self, name: str, timeout: float | None = None) -> tuple[float, str, bool]:
        """Wait until the mark ``name`` has been echoed; returns (time, name, cleared)."""
        await self.wait_until(lambda: any(entry[1] == name for entry in self.marks_echoed), timeout)
        return next(entry for entry in self.marks_echoed if entry[1] == name)

    # ---- internals: sending

    def _notify_progress(self) -> None:
        waiters, self._progress_waiters = self._progress_waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    async def _send_unnumbered(self, message: dict[str, Any]) -> None:
        assert self._ws is not None
        async with self._send_lock:
            await self._ws.send(json.dumps(message))
            self.sent.append((asyncio.get_running_loop().time(), message))
            self._notify_progress()

    async def _send(self, message: dict[str, Any], *, last: bool = False) -> bool:
        """Send one numbered message; sequenceNumber goes right after event as in Twilio's examples."""
        if self._ws is None:
            return False
        async with self._send_lock:
            if self._no_more_sends:
                return False
            self._seq += 1
            event = message["event"]
            rest = {key: value for key, value in message.items() if key != "event"}
            numbered = {"event": event, "sequenceNumber": str(self._seq), **rest}
            try:
                await self._ws.send(json.dumps(numbered))
            finally:
                if last:
                    self._no_more_sends = True
            if event == "media":
                self.media_frames_sent += 1
            if self.record_media or event != "media":
                self.sent.append((asyncio.get_running_loop().time(), numbered))
            self._notify_progress()
            return True

    def _next_frame(self) -> bytes:
        if not self._speech:
            return bytes([MULAW_SILENCE]) * FRAME_BYTES
        frame = bytes(self._speech[:FRAME_BYTES])
        del self._speech[:FRAME_BYTES]
        if not self._speech:
            self.speech_done.set()
        return frame.ljust(FRAME_BYTES, bytes([MULAW_SILENCE]))

    async def _media_loop(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        self.media_started_at = start
        index = 0
        try:
            while True:
                # Frame n is due at start + n * frame_interval, so lateness never accumulates.
                delay = start + index * self.frame_interval - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                payload = base64.b64encode(self._next_frame()).decode("ascii")
                sent = await self._send(
                    {
                        "event": "media",
                        "media": {
                            "track": "inbound",
                            "chunk": str(index + 1),
                            "timestamp": str(index * 20),
                            "payload": payload,
                        },
                        "streamSid": self.stream_sid,
                    }
                )
                if not sent:
                    return
                index += 1
        except ConnectionClosed:
            return

    # ---- internals: receiving and playback

    async def _receive_loop(self) -> None:
        assert self._ws is not None
        try:
            async for message in self._ws:
                await self._handle_message(message)
                self._notify_progress()
        except ConnectionClosed:
            pass
        finally:
            self._mark_closed(self._closing_by or "server")

    def _invalid(self, now: float, problem: str) -> None:
        self.invalid.append((now, problem))
        log.debug("twilio emulator: invalid message from server: %s", problem)

    async def _handle_message(self, message: str | bytes) -> None:
        now = asyncio.get_running_loop().time()
        if isinstance(message, bytes):
            self.received.append((now, message))
            self._invalid(now, f"binary frame of {len(message)} bytes (Twilio expects JSON text frames)")
            return
        try:
            parsed = json.loads(message)
        except ValueError:
            self.received.append((now, message))
            self._invalid(now, f"bad JSON: {message[:80]!r}")
            return
        if not isinstance(parsed, dict):
            self.received.append((now, message))
            self._invalid(now, f"JSON is not an object: {message[:80]!r}")
            return
        event = parsed.get("event")
        if event == "media":
            self.media_messages_received += 1
        if self.record_media or event != "media":
            self.received.append((now, parsed))
        if event not in ("media", "mark", "clear"):
            self._invalid(now, f"unknown event {event!r}")
            return
        if not self.started.is_set():
            self._invalid(now, f"{event} before start")
            return
        if parsed.get("streamSid") != self.stream_sid:
            self._invalid(now, f"{event} with wrong streamSid {parsed.get('streamSid')!r}")
            return
        if event == "media":
            media = parsed.get("media")
            payload = media.get("payload") if isinstance(media, dict) else None
            if not isinstance(payload, str):
                self._invalid(now, "media without media.payload string")
                return
            try:
                audio = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                self._invalid(now, "media.payload is not valid base64")
                return
            if audio:
                self._playback.append(audio)
                self._playback_wake.set()
        elif event == "mark":
            mark = parsed.get("mark")
            name = mark.get("name") if isinstance(mark, dict) else None
            if not isinstance(name, str):
                self._invalid(now, "mark without mark.name string")
                return
            self._playback.append(_PendingMark(name))
            self._playback_wake.set()
        else:
            await self._clear(now)

    async def _clear(self, now: float) -> None:
        self.clears.append(now)
        self._playback_generation += 1
        pending_marks: list[str] = []
        cleared = len(self._current_frame)
        self._current_frame = b""
        for item in self._playback:
            if isinstance(item, _PendingMark):
                pending_marks.append(item.name)
            else:
                cleared += len(item)
        self._playback.clear()
        self.cleared_audio_bytes += cleared
        self._clear_interrupt.set()
        for name in pending_marks:
            await self._echo_mark(name, cleared=True)

    async def _echo_mark(self, name: str, *, cleared: bool) -> None:
        now = asyncio.get_running_loop().time()
        sent = False
        with contextlib.suppress(ConnectionClosed):
            sent = await self._send({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}})
        if sent:
            self.marks_echoed.append((now, name, cleared))
            if not cleared:
                self.last_mark_played_at = now
        self._notify_progress()

    def _take_frame(self) -> bytes:
        # Up to 20 ms of consecutive audio; a mark in the queue ends the frame early.
        frame = bytearray()
        while self._playback and len(frame) < FRAME_BYTES:
            head = self._playback[0]
            if isinstance(head, _PendingMark):
                break
            need = FRAME_BYTES - len(frame)
            frame += head[:need]
            if len(head) > need:
                self._playback[0] = head[need:]
            else:
                self._playback.popleft()
        return bytes(frame)

    async def _playback_loop(self) -> None:
        loop = asyncio.get_running_loop()
        line_free_at = loop.time()
        while True:
            if not self._playback:
                self._playback_wake.clear()
                await self._playback_wake.wait()
                continue
            head = self._playback[0]
            if isinstance(head, _PendingMark):
                self._playback.popleft()
                await self._echo_mark(head.name, cleared=False)
                continue
            frame = self._take_frame()
            # Back-to-back frames are scheduled from the previous frame's end, so no drift.
            ends_at = max(line_free_at, loop.time()) + len(frame) / BYTES_PER_SECOND
            generation = self._playback_generation
            self._current_frame = frame
            self._clear_interrupt.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(ends_at):
                    await self._clear_interrupt.wait()
            if generation != self._playback_generation:
                line_free_at = loop.time()  # the clear already counted this frame as cleared
                continue
            self._current_frame = b""
            self.played_audio += frame
            self.last_audio_played_at = ends_at
            line_free_at = ends_at

    def _mark_closed(self, closed_by: str) -> None:
        if self.closed.is_set():
            return
        self.closed_by = closed_by
        self.closed_at = asyncio.get_running_loop().time()
        if self._ws is not None:
            self.close_code = self._ws.close_code
            self.close_reason = self._ws.close_reason
        self._no_more_sends = True
        current = asyncio.current_task()
        for task in (self._media_task, self._playback_task):
            if task is not None and task is not current:
                task.cancel()
        self.finished_sending.set()
        self.closed.set()
        self._notify_progress()
        if self.on_closed is not None:
            self.on_closed(self)


# --------------------------------------------------------------------------------------------- calls


class EmulatedCall:
    """One call as Twilio sees it."""

    def __init__(
        self,
        emulator: TwilioEmulator,
        *,
        sid: str,
        from_: str,
        to: str,
        direction: str,
        status: str,
    ) -> None:
        self._emulator = emulator
        self.sid = sid
        self.account_sid = emulator.account_sid
        self.from_ = from_
        self.to = to
        self.direction = direction  # "inbound" | "outbound-api"
        self.status = status
        self.date_created = _utcnow()
        self.date_updated = self.date_created
        self.start_time: datetime | None = self.date_created
        self.answered_time: datetime | None = None
        self.end_time: datetime | None = None
        self.ended = asyncio.Event()
        self.ended_at: float | None = None  # loop time
        self.end_cause: str | None = None
        self.end_detail: str | None = (
            None  # e.g. what the redirected TwiML did ("twiml_hangup", "dial_finished")
        )
        self.redirect_twiml: str | None = None  # the Twiml (or Url) of the latest REST redirect
        self.redirects: list[dict[str, str]] = []
        self.twiml_documents: list[str] = []
        self.twiml_errors: list[str] = []
        self.said: list[str] = []
        self.played: list[str] = []
        self.dialed: list[str] = []
        self.unsupported_verbs: list[str] = []
        self.reject_reason: str | None = None
        self.status_callback: str | None = None
        self.status_callback_method = "POST"
        self.status_callback_events: set[str] = {"completed"}
        self.status_callbacks_sent: list[dict[str, str]] = []
        self.stream: MediaStreamCaller | None = None
        self.streams: list[MediaStreamCaller] = []
        self.caller_audio = b""
        self.history: list[tuple[float, str]] = [(asyncio.get_running_loop().time(), status)]
        self.stream_connected = asyncio.Event()
        self.stream_upgrade_fault: str | None = None  # set when its stream was sent through one

        self._status_waiters: list[asyncio.Future[None]] = []
        self._callback_seq = 0
        self._callback_chain: asyncio.Task[None] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._settled = asyncio.Event()
        self._stream_signature: str | None = None
        self._pending_twiml: str | None = None
        self._pending_url: str | None = None
        self._pending_method = "POST"

    def __repr__(self) -> str:
        return f"<EmulatedCall {self.sid} {self.direction} {self.status} end_cause={self.end_cause}>"

    @property
    def is_ended(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def duration(self) -> int | None:
        """Seconds from answer to end, as Twilio reports it (only for completed calls)."""
        if self.status != "completed" or self.end_time is None:
            return None
        if self.answered_time is None:
            return 0
        return math.ceil((self.end_time - self.answered_time).total_seconds())

    async def wait_ended(self, timeout: float | None = None) -> str | None:
        """Wait for the call to end; returns its end_cause."""
        async with asyncio.timeout(timeout):
            await self.ended.wait()
        return self.end_cause

    async def wait_status(self, *statuses: str, timeout: float | None = None) -> str:
        """Wait until the call's status is one of ``statuses``; returns it."""
        async with asyncio.timeout(timeout):
            while self.status not in statuses:
                future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._status_waiters.append(future)
                try:
                    await future
                finally:
                    with contextlib.suppress(ValueError):
                        self._status_waiters.remove(future)
        return self.status

    async def wait_stream(self, timeout: float | None = None) -> MediaStreamCaller:
        """Wait until a media stream is connected (``start`` sent) and return it."""
        async with asyncio.timeout(timeout):
            await self.stream_connected.wait()
        assert self.stream is not None
        return self.stream

    async def hangup(self) -> None:
        """The caller hangs up, whatever the call is doing."""
        if self.stream is not None and self.stream.is_open:
            await self.stream.hangup()
        else:
            self._emulator._finish_call(
                self, "completed" if self.answered_time else "canceled", "caller_hangup"
            )

    def to_resource(self) -> dict[str, Any]:
        """The Call resource's JSON, with the fields the official SDK's CallInstance reads."""
        base = f"/{API_VERSION}/Accounts/{self.account_sid}/Calls/{self.sid}"
        duration = self.duration
        return {
            "account_sid": self.account_sid,
            "annotation": None,
            "answered_by": None,
            "api_version": API_VERSION,
            "caller_name": None,
            "date_created": _rfc2822(self.date_created),
            "date_updated": _rfc2822(self.date_updated),
            "direction": self.direction,
            "duration": str(duration) if duration is not None else None,
            "end_time": _rfc2822(self.end_time),
            "forwarded_from": None,
            "from": self.from_,
            "from_formatted": _format_number(self.from_),
            "group_sid": None,
            "parent_call_sid": None,
            "phone_number_sid": None,
            "price": None,
            "price_unit": "USD",
            "queue_time": "0",
            "sid": self.sid,
            "start_time": _rfc2822(self.start_time),
            "status": self.status,
            "stir_verstat": None,
            "subresource_uris": {
                name: f"{base}/{path}.json"
                for name, path in (
                    ("feedback", "Feedback"),
                    ("notifications", "Notifications"),
                    ("recordings", "Recordings"),
                    ("streams", "Streams"),
                    ("payments", "Payments"),
                    ("siprec", "Siprec"),
                    ("events", "Events"),
                    ("transcriptions", "Transcriptions"),
                    ("user_defined_messages", "UserDefinedMessages"),
                    ("user_defined_message_subscriptions", "UserDefinedMessageSubscriptions"),
                )
            },
            "to": self.to,
            "to_formatted": _format_number(self.to),
            "trunk_sid": None,
            "uri": f"{base}.json",
        }


# --------------------------------------------------------------------------------------------- server


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside our event loop: no signal handlers taken over, no 100 ms polling loop."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()
        self.exit_requested = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()

    async def main_loop(self) -> None:
        await self.on_tick(0)
        await self.exit_requested.wait()


class TwilioEmulator:
    """The Twilio REST Calls API and the Twilio side of calls, on loopback.

    Timing knobs (seconds): ``ring_delay`` (outbound: queued -> ringing), ``answer_delay``
    (ringing -> answered), ``say_seconds`` (how long a ``<Say>``/``<Play>``/``<Pause>`` takes),
    ``dial_seconds`` (how long a ``<Dial>``'d conversation lasts before the far end hangs up;
    ``None`` keeps the call in progress until REST or :meth:`EmulatedCall.hangup` ends it).
    When a TwiML document runs out of verbs the call completes, as on Twilio.
    """

    def __init__(
        self,
        account_sid: str = DEFAULT_ACCOUNT_SID,
        auth_token: str = "test-token",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        sign_requests: bool = True,
        ring_delay: float = 0.02,
        answer_delay: float = 0.05,
        say_seconds: float = 0.0,
        dial_seconds: float | None = 0.2,
        hangup_ended_call_error: bool = False,
        outbound_outcome: str = "answer",
        outbound_audio: bytes = b"",
        status_callback_url: str | None = None,
        status_callback_events: Iterable[str] = ("completed",),
        status_callback_method: str = "POST",
        webhook_timeout: float = 15.0,
        stream_open_timeout: float = 5.0,
        stream_close_timeout: float = 2.0,
        record_media: bool = True,
        media_frame_interval: float = FRAME_SECONDS,
        stream_upgrade_fault: str | None = None,
    ) -> None:
        if not _is_loopback_host(host):
            raise ValueError(f"the Twilio emulator only listens on loopback addresses, not {host!r}")
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.host = host
        self.port = port
        self.sign_requests = sign_requests
        self.ring_delay = ring_delay
        self.answer_delay = answer_delay
        self.say_seconds = say_seconds
        self.dial_seconds = dial_seconds
        # Real Twilio's answer to Status=completed on a call that already ended is not documented;
        # see _update_call. False: 200 with the call unchanged; True: 400 / 21220.
        self.hangup_ended_call_error = hangup_ended_call_error
        # What the callee of an outbound call does: "answer" | "busy" | "no-answer" | "failed".
        self.outbound_outcome = outbound_outcome
        self.outbound_audio = outbound_audio
        self.status_callback_url = status_callback_url
        self.status_callback_events = set(status_callback_events)
        self.status_callback_method = status_callback_method.upper()
        self.webhook_timeout = webhook_timeout
        self.stream_open_timeout = stream_open_timeout
        self.stream_close_timeout = stream_close_timeout
        self.record_media = record_media
        self.media_frame_interval = media_frame_interval
        # None, or how the streams of calls run from now on fail to connect: "drop" | "hang".
        self.stream_upgrade_fault = stream_upgrade_fault

        self.calls: dict[str, EmulatedCall] = {}
        self.requests: list[RecordedRequest] = []
        self.webhooks: list[WebhookRecord] = []  # every voice webhook and status callback we sent

        self._faults: dict[str, deque[_Fault]] = {}
        self._call_waiters: list[asyncio.Future[None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._callback_tasks: set[asyncio.Task[Any]] = set()
        self._closing = asyncio.Event()
        self._server: _EmbeddedServer | None = None
        self._server_task: asyncio.Task[None] | None = None
        self._http: httpx.AsyncClient | None = None
        self._base_url: str | None = None
        self._blackholes: dict[str, asyncio.Server] = {}
        self._blackhole_conns: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    # ---- lifecycle

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    @property
    def base_url(self) -> str:
        """The REST API root, e.g. ``http://127.0.0.1:PORT`` (use as TWILIO_API_BASE_URL)."""
        if self._base_url is None:
            raise RuntimeError("TwilioEmulator is not started")
        return self._base_url

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("TwilioEmulator already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        host = f"[{self.host}]" if family == socket.AF_INET6 else self.host
        self._base_url = f"http://{host}:{self.port}"
        config = uvicorn.Config(
            self._build_app(),
            lifespan="off",
            log_level="warning",
            log_config=None,  # leave the process's logging configuration alone
            access_log=False,
            ws="none",
            timeout_graceful_shutdown=2,
            server_header=False,
        )
        server = _EmbeddedServer(config)
        self._server = server
        self._http = httpx.AsyncClient(trust_env=False, timeout=self.webhook_timeout)
        task = asyncio.create_task(server.serve(sockets=[sock]), name="twilio-emulator-uvicorn")
        self._server_task = task
        task.add_done_callback(lambda _: server.ready.set())
        await server.ready.wait()
        if task.done():
            sock.close()
            await self._http.aclose()
            task.result()
            raise RuntimeError("the Twilio emulator's server stopped during startup")

    async def aclose(self) -> None:
        """End every call (streams get stop + close), stop the server; nothing is left running."""
        if self._server is None or self._closing.is_set():
            return
        self._closing.set()
        for call in list(self.calls.values()):
            self._finish_call(call, "completed" if call.answered_time else "canceled", "emulator_shutdown")
        streams = [stream for call in self.calls.values() for stream in call.streams]
        if streams:
            await asyncio.gather(*(stream.aclose() for stream in streams), return_exceptions=True)
        # Give the last status callbacks a moment to arrive, as Twilio would still send them.
        pending = {task for task in self._callback_tasks if not task.done()}
        if pending:
            await asyncio.wait(pending, timeout=2.0)
        for task in list(self._tasks):
            await _cancel_and_wait(task)
        await self._close_blackholes()
        self._server.should_exit = True
        self._server.exit_requested.set()
        if self._server_task is not None:
            await asyncio.wait({self._server_task})
            if not self._server_task.cancelled() and self._server_task.exception() is not None:
                log.error(
                    "twilio emulator: server stopped with an error", exc_info=self._server_task.exception()
                )
        if self._http is not None:
            await self._http.aclose()

    def _spawn(self, coro: Coroutine[Any, Any, Any], *, name: str | None = None) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self._callback_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("twilio emulator task %s failed", task.get_name(), exc_info=task.exception())

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake early when the emulator shuts down."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._closing.wait()

    # ---- faults

    def inject_fault(
        self,
        operation: str,
        *,
        status: int | None = None,
        code: int | None = None,
        message: str | None = None,
        retry_after: float | None = None,
        delay: float = 0.0,
    ) -> None:
        """Script the answer to the next REST ``operation`` ("create" | "update" | "fetch" | "list").

        Faults are consumed in order, one per request.  ``delay`` makes the answer late; with no
        ``status`` the request is then processed normally (a slow Twilio: the change still
        happens even if the client has given up waiting).
        """
        if operation not in ("create", "update", "fetch", "list"):
            raise ValueError(f"unknown operation {operation!r}")
        self._faults.setdefault(operation, deque()).append(_Fault(status, code, message, retry_after, delay))

    async def _apply_fault(self, operation: str) -> Response | None:
        queue = self._faults.get(operation)
        if not queue:
            return None
        fault = queue.popleft()
        if fault.delay:
            await self._sleep(fault.delay)
        if fault.status is None:
            return None
        code = fault.code or _DEFAULT_ERROR_CODES.get(fault.status, 20000 + fault.status)
        message = fault.message or _DEFAULT_ERROR_MESSAGES.get(code, f"Injected fault {fault.status}")
        headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else None
        return JSONResponse(
            _error_body(fault.status, code, message), status_code=fault.status, headers=headers
        )

    # ---- REST API

    def _build_app(self) -> Starlette:
        calls_path = f"/{API_VERSION}/Accounts/{{account_sid}}/Calls.json"
        call_path = f"/{API_VERSION}/Accounts/{{account_sid}}/Calls/{{call_sid}}.json"
        methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]
        return Starlette(
            routes=[
                Route(calls_path, self._calls_endpoint, methods=methods),
                Route(call_path, self._call_endpoint, methods=methods),
                Route("/{path:path}", self._not_found_endpoint, methods=methods),
            ]
        )

    async def _record(self, request: Request) -> list[tuple[str, str]]:
        if request.method == "GET":
            items = list(request.query_params.multi_items())
        else:
            body = (await request.body()).decode("utf-8", "replace")
            items = parse_qsl(body, keep_blank_values=True)
        self.requests.append(
            RecordedRequest(
                time=asyncio.get_running_loop().time(),
                method=request.method,
                path=request.url.path,
                form=dict(items),
                headers=dict(request.headers),
                items=items,
            )
        )
        return items

    def _authenticate(self, request: Request) -> Response | None:
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, ValueError):
            user = password = ""
        ok = (
            scheme.lower() == "basic"
            and hmac.compare_digest(user, self.account_sid)
            and hmac.compare_digest(password, self.auth_token)
        )
        if not ok:
            return JSONResponse(
                _error_body(401, 20003, "Authenticate"),
                status_code=401,
                headers={"WWW-Authenticate": 'Basic realm="Twilio API"'},
            )
        if request.path_params.get("account_sid") != self.account_sid:
            return self._not_found(request)
        return None

    @staticmethod
    def _not_found(request: Request) -> Response:
        return JSONResponse(
            _error_body(404, 20404, f"The requested resource {request.url.path} was not found"),
            status_code=404,
        )

    async def _not_found_endpoint(self, request: Request) -> Response:
        await self._record(request)
        return self._not_found(request)

    @staticmethod
    def _method_not_allowed() -> Response:
        return JSONResponse(_error_body(405, 20004, "Method not allowed"), status_code=405)

    async def _calls_endpoint(self, request: Request) -> Response:
        items = await self._record(request)
        denied = self._authenticate(request)
        if denied is not None:
            return denied
        if request.method not in ("GET", "POST"):
            return self._method_not_allowed()
        fault = await self._apply_fault("create" if request.method == "POST" else "list")
        if fault is not None:
            return fault
        if request.method == "POST":
            return await self._create_call(items)
        return self._list_calls(request, dict(items))

    async def _call_endpoint(self, request: Request) -> Response:
        items = await self._record(request)
        denied = self._authenticate(request)
        if denied is not None:
            return denied
        if request.method == "GET":
            fault = await self._apply_fault("fetch")
        elif request.method == "POST":
            fault = await self._apply_fault("update")
        else:
            return self._method_not_allowed()
        if fault is not None:
            return fault
        call = self.calls.get(request.path_params["call_sid"])
        if call is None:
            return self._not_found(request)
        if request.method == "GET":
            return JSONResponse(call.to_resource())
        return await self._update_call(call, dict(items))

    def _list_calls(self, request: Request, query: dict[str, str]) -> Response:
        calls = sorted(self.calls.values(), key=lambda c: c.date_created, reverse=True)
        for key, attr in (("Status", "status"), ("To", "to"), ("From", "from_")):
            if key in query:
                calls = [c for c in calls if getattr(c, attr) == query[key]]
        try:
            page_size = max(1, min(1000, int(query.get("PageSize", "50"))))
        except ValueError:
            page_size = 50
        calls = calls[:page_size]
        uri = request.url.path
        return JSONResponse(
            {
                "calls": [c.to_resource() for c in calls],
                "end": max(len(calls) - 1, 0),
                "first_page_uri": f"{uri}?PageSize={page_size}&Page=0",
                "next_page_uri": None,
                "page": 0,
                "page_size": page_size,
                "previous_page_uri": None,
                "start": 0,
                "uri": f"{uri}?PageSize={page_size}&Page=0",
            }
        )

    async def _create_call(self, items: list[tuple[str, str]]) -> Response:
        form = dict(items)
        to, from_ = form.get("To", ""), form.get("From", "")
        twiml, url = form.get("Twiml"), form.get("Url")
        if not to:
            return JSONResponse(_error_body(400, 21201, "No 'To' number is specified"), status_code=400)
        if not from_:
            return JSONResponse(
                _error_body(400, 21603, "A 'From' phone number is required."), status_code=400
            )
        if not twiml and not url and not form.get("ApplicationSid"):
            return JSONResponse(
                _error_body(400, 21205, "Either Url, Twiml or ApplicationSid parameter is required."),
                status_code=400,
            )
        call = self._new_call(from_=from_, to=to, direction="outbound-api", status="queued")
        call.caller_audio = self.outbound_audio
        call._pending_twiml, call._pending_url = twiml, url
        call._pending_method = form.get("Method", "POST").upper() or "POST"
        if form.get("StatusCallback"):
            call.status_callback = form["StatusCallback"]
            call.status_callback_method = form.get("StatusCallbackMethod", "POST").upper() or "POST"
            # The SDK repeats StatusCallbackEvent; some clients send one space-separated value.
            events = {e for key, value in items if key == "StatusCallbackEvent" for e in value.split()}
            call.status_callback_events = events or {"completed"}
        self._emit_status_callback(call, "initiated")
        call._runner = self._spawn(self._run_outbound(call), name=f"twilio-emu-outbound-{call.sid}")
        return JSONResponse(call.to_resource(), status_code=201)

    async def _update_call(self, call: EmulatedCall, form: dict[str, str]) -> Response:
        status, twiml, url = form.get("Status"), form.get("Twiml"), form.get("Url")
        if form.get("StatusCallback"):
            call.status_callback = form["StatusCallback"]
            call.status_callback_method = form.get("StatusCallbackMethod", "POST").upper() or "POST"
        if status:
            if status not in ("completed", "canceled"):
                return JSONResponse(
                    _error_body(400, 20001, f"Invalid Status {status!r}: must be canceled or completed"),
                    status_code=400,
                )
            if call.is_ended:
                # Twilio documents 21220 for redirecting a finished call, but not what hanging up a
                # finished call answers.  Hanging up is idempotent in effect, and clients (pipecat,
                # our own design) must accept both a 200 and an error here, so the default is the
                # unchanged call; hangup_ended_call_error=True switches to 400 / 21220.
                if status == "completed" and self.hangup_ended_call_error:
                    return JSONResponse(
                        _error_body(400, 21220, "Call is not in-progress. Cannot hang up."), status_code=400
                    )
                return JSONResponse(call.to_resource())
            if call.status in ("queued", "ringing"):
                # A call not yet answered cannot be "completed"; both values cancel it.
                self._finish_call(
                    call, "canceled", "rest_canceled" if status == "canceled" else "rest_completed"
                )
            elif status == "completed":
                self._finish_call(call, "completed", "rest_completed")
                await self._stop_sent(call)
            # Status=canceled "will not affect calls already in progress" (Twilio docs): unchanged.
            return JSONResponse(call.to_resource())
        if twiml or url:
            if call.is_ended:
                return JSONResponse(
                    _error_body(400, 21220, "Call is not in-progress. Cannot redirect."), status_code=400
                )
            method = form.get("Method", "POST").upper() or "POST"
            if call.status in ("queued", "ringing"):
                # Not answered yet: the new instructions are what runs when it is.
                call._pending_twiml, call._pending_url, call._pending_method = twiml, url, method
                return JSONResponse(call.to_resource())
            self._redirect(call, twiml=twiml, url=url, method=method)
            await self._stop_sent(call)
        return JSONResponse(call.to_resource())

    async def _stop_sent(self, call: EmulatedCall) -> None:
        # The REST answer comes after Twilio has sent `stop`, but never waits for the close
        # handshake: the application may well be busy waiting for this very answer.
        stream = call.stream
        if stream is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await stream.finished_sending.wait()

    # ---- call lifecycle

    def _new_call(self, *, from_: str, to: str, direction: str, status: str) -> EmulatedCall:
        call = EmulatedCall(self, sid=new_sid("CA"), from_=from_, to=to, direction=direction, status=status)
        self.calls[call.sid] = call
        waiters, self._call_waiters = self._call_waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)
        return call

    def _set_status(self, call: EmulatedCall, status: str) -> None:
        if call.status == status or call.is_ended:
            return
        now = _utcnow()
        call.status = status
        call.date_updated = now
        call.history.append((asyncio.get_running_loop().time(), status))
        waiters, call._status_waiters = call._status_waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)
        if status == "in-progress":
            call.answered_time = now
        if status in TERMINAL_STATUSES:
            # end_time and duration are documented as empty unless the call completed.
            if status == "completed":
                call.end_time = now
            call.ended_at = asyncio.get_running_loop().time()
        self._emit_status_callback(call, _EVENT_OF_STATUS[status])
        if status in TERMINAL_STATUSES:
            call.ended.set()
            call._settled.set()

    def _answer(self, call: EmulatedCall) -> None:
        if call.status in ("queued", "ringing"):
            self._set_status(call, "in-progress")

    def _finish_call(self, call: EmulatedCall, status: str, cause: str, detail: str | None = None) -> None:
        """End the call once; its stream (if any) gets Twilio's stop + close."""
        if call.is_ended:
            return
        call.end_cause = cause
        call.end_detail = detail or cause
        self._set_status(call, status)
        runner = call._runner
        if runner is not None and runner is not asyncio.current_task():
            runner.cancel()
        stream = call.stream
        if stream is not None and stream.is_open:
            self._spawn(stream.end_stream(send_stop=True), name=f"twilio-emu-stop-{stream.stream_sid}")

    def _redirect(self, call: EmulatedCall, *, twiml: str | None, url: str | None, method: str) -> None:
        # Redirecting ends <Connect><Stream> (Twilio sends stop and closes), then runs the new TwiML.
        call.redirect_twiml = twiml if twiml else url
        call.redirects.append({"Twiml": twiml} if twiml else {"Url": url or "", "Method": method})
        old_runner = call._runner
        if old_runner is not None and not old_runner.done():
            old_runner.cancel()
        stream = call.stream
        if stream is not None and stream.is_open:
            self._spawn(stream.end_stream(send_stop=True), name=f"twilio-emu-stop-{stream.stream_sid}")
        call._runner = self._spawn(
            self._run_document(
                call, twiml=twiml, url=url, method=method, forced_cause="rest_redirect", after=stream
            ),
            name=f"twilio-emu-redirect-{call.sid}",
        )

    async def _run_outbound(self, call: EmulatedCall) -> None:
        try:
            await self._sleep(self.ring_delay)
            self._set_status(call, "ringing")
            await self._sleep(self.answer_delay)
            if self.outbound_outcome != "answer":
                self._finish_call(call, self.outbound_outcome, f"callee_{self.outbound_outcome}")
                return
            self._answer(call)
            await self._run_document(
                call, twiml=call._pending_twiml, url=call._pending_url, method=call._pending_method
            )
        finally:
            call._settled.set()

    async def _run_document(
        self,
        call: EmulatedCall,
        *,
        twiml: str | None,
        url: str | None,
        method: str = "POST",
        forced_cause: str | None = None,
        after: MediaStreamCaller | None = None,
        webhook_signature: str | None = None,
    ) -> None:
        try:
            if after is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.stream_close_timeout + 1.0):
                        await after.closed.wait()
            doc_url = url
            if twiml is None:
                if url is None:
                    self._finish_call(call, "completed", forced_cause or "twiml_finished")
                    return
                twiml = await self._fetch_twiml(call, url, method, signature=webhook_signature)
                if twiml is None:
                    # Twilio says "an application error has occurred" and hangs up.
                    self._answer(call)
                    self._finish_call(call, "completed", forced_cause or "webhook_error", "webhook_error")
                    return
            await self._execute(call, twiml, doc_url, forced_cause)
        finally:
            call._settled.set()

    async def _execute(
        self, call: EmulatedCall, twiml: str, doc_url: str | None, forced_cause: str | None
    ) -> None:
        call.twiml_documents.append(twiml)
        try:
            root = ET.fromstring(twiml)
        except ET.ParseError as exc:
            call.twiml_errors.append(f"invalid XML: {exc}")
            root = None
        if root is None or root.tag != "Response":
            if root is not None:
                call.twiml_errors.append(f"root element is <{root.tag}>, not <Response>")
            self._answer(call)
            self._finish_call(call, "completed", forced_cause or "twiml_error", "twiml_error")
            return
        natural_end = "twiml_finished"
        for verb in list(root):
            if call.is_ended:
                return
            tag = verb.tag
            text = (verb.text or "").strip()
            if tag == "Connect":
                stream_el = verb.find("Stream")
                if stream_el is None:
                    call.unsupported_verbs.append("Connect/" + ",".join(child.tag for child in verb))
                    continue
                self._answer(call)
                caller = await self._open_stream(call, stream_el, doc_url)
                await caller.closed.wait()
                if call.is_ended:
                    return
                # Our server closed the socket: Twilio goes on with the TwiML after <Connect>.
                natural_end = _CAUSE_OF_STREAM_END.get(caller.closed_by or "", "stream_closed")
            elif tag == "Say":
                self._answer(call)
                call.said.append(text)
                await self._sleep(self.say_seconds)
            elif tag == "Play":
                self._answer(call)
                call.played.append(text or verb.get("digits", ""))
                await self._sleep(self.say_seconds)
            elif tag == "Pause":
                self._answer(call)
                await self._sleep(self.say_seconds)
            elif tag == "Dial":
                self._answer(call)
                targets = [(child.text or "").strip() for child in verb] or [text]
                call.dialed.extend(targets)
                if self.dial_seconds is None:
                    await call.ended.wait()
                    return
                await self._sleep(self.dial_seconds)
                natural_end = "dial_finished"
            elif tag == "Hangup":
                self._answer(call)
                self._finish_call(call, "completed", forced_cause or "twiml_hangup", "twiml_hangup")
                return
            elif tag == "Reject":
                # Whether Twilio reports reason="rejected" as busy or no-answer is not documented in
                # our specs; both are reported as "busy", with the reason kept in reject_reason.
                call.reject_reason = verb.get("reason", "rejected")
                if call.answered_time is None:
                    self._finish_call(call, "busy", forced_cause or "rejected", "rejected")
                else:
                    self._finish_call(call, "completed", forced_cause or "rejected", "rejected")
                return
            elif tag == "Redirect":
                target = urljoin(doc_url or "", text) if doc_url else text
                await self._run_document(
                    call,
                    twiml=None,
                    url=target,
                    method=verb.get("method", "POST").upper(),
                    forced_cause=forced_cause,
                )
                return
            else:
                call.unsupported_verbs.append(tag)
        self._finish_call(call, "completed", forced_cause or natural_end, natural_end)

    async def _open_stream(
        self, call: EmulatedCall, stream_el: ET.Element, doc_url: str | None
    ) -> MediaStreamCaller:
        raw_url = stream_el.get("url", "")
        url = raw_url
        if doc_url and not urlsplit(raw_url).scheme:
            # A relative url is resolved against the document's URL, http(s) -> ws(s).
            joined = urlsplit(urljoin(doc_url, raw_url))
            url = urlunsplit(
                joined._replace(scheme={"https": "wss", "http": "ws"}.get(joined.scheme, joined.scheme))
            )
        params: dict[str, str] = {}
        for param in stream_el.findall("Parameter"):
            name = param.get("name")
            if name is not None:
                params[name] = param.get("value", "")
        audio = call.caller_audio if not call.streams else b""
        caller = MediaStreamCaller(
            url,
            account_sid=self.account_sid,
            auth_token=self.auth_token,
            call_sid=call.sid,
            audio=audio,
            custom_parameters=params,
            signature=call._stream_signature,
            sign=self.sign_requests,
            open_timeout=self.stream_open_timeout,
            close_timeout=self.stream_close_timeout,
            record_media=self.record_media,
            frame_interval=self.media_frame_interval,
            connect_to=await self._blackhole(self.stream_upgrade_fault),
        )
        call.stream_upgrade_fault = self.stream_upgrade_fault
        caller.on_hangup = lambda _: self._finish_call(call, "completed", "caller_hangup")
        call.streams.append(caller)
        call.stream = caller
        if await caller.connect():
            call.stream_connected.set()
        call._settled.set()
        return caller

    # ---- a stream that never connects

    async def _blackhole(self, fault: str | None) -> tuple[str, int] | None:
        """The address of the loopback "proxy" that fails upgrades the ``fault`` way (started once)."""
        if fault is None:
            return None
        if fault not in ("drop", "hang"):
            raise ValueError(f"stream_upgrade_fault must be None, 'drop' or 'hang', not {fault!r}")
        server = self._blackholes.get(fault)
        if server is None:

            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await self._blackhole_connection(fault, reader, writer)

            server = await asyncio.start_server(handle, self.host, 0)
            self._blackholes[fault] = server
        host, port = server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def _blackhole_connection(
        self, fault: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._blackhole_conns[task] = writer
        try:
            # The upgrade request arrives (its head ends with an empty line)...
            with contextlib.suppress(asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
                await reader.readuntil(b"\r\n\r\n")
                if fault == "hang":
                    # ... and is never answered: held until the client gives up or goes away.
                    while await reader.read(4096):
                        pass
            # "drop": closed at once, no answer at all.
        finally:
            del self._blackhole_conns[task]
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _close_blackholes(self) -> None:
        servers, self._blackholes = list(self._blackholes.values()), {}
        for server in servers:
            server.close()
        for writer in list(self._blackhole_conns.values()):
            writer.close()
        if self._blackhole_conns:
            await asyncio.wait(set(self._blackhole_conns), timeout=2.0)
        for server in servers:
            await server.wait_closed()

    # ---- calls started by the test

    async def place_inbound_call(
        self,
        webhook_url: str,
        *,
        from_: str = "+15550001111",
        to: str = "+15550002222",
        audio: bytes = b"",
        method: str = "POST",
        signature: str | None = None,
        stream_signature: str | None = None,
        status_callback: str | None = None,
        status_callback_events: Iterable[str] | None = None,
        status_callback_method: str | None = None,
        timeout: float | None = None,
    ) -> EmulatedCall:
        """A phone call arrives: Twilio POSTs the voice webhook and runs the TwiML it gets back.

        Returns once the media stream is connected (``start`` sent), or the call has ended, or
        the TwiML has moved on.  ``signature``/``stream_signature`` override the X-Twilio-Signature
        of the webhook / of the WebSocket upgrade (negative tests).
        """
        _require_loopback_url(webhook_url)
        call = self._new_call(from_=from_, to=to, direction="inbound", status="ringing")
        call.caller_audio = audio
        call._stream_signature = stream_signature
        call.status_callback = status_callback or self.status_callback_url
        call.status_callback_method = (status_callback_method or self.status_callback_method).upper()
        events = status_callback_events if status_callback_events is not None else self.status_callback_events
        call.status_callback_events = set(events)
        call._runner = self._spawn(
            self._run_document(
                call, twiml=None, url=webhook_url, method=method.upper(), webhook_signature=signature
            ),
            name=f"twilio-emu-inbound-{call.sid}",
        )
        await self._wait_settled(call, timeout)
        return call

    async def start_stream_call(
        self,
        ws_url: str,
        *,
        audio: bytes = b"",
        custom_parameters: Mapping[str, str] | None = None,
        from_: str = "+15550001111",
        to: str = "+15550002222",
        direction: str = "inbound",
        signature: str | None = None,
        status_callback: str | None = None,
        status_callback_events: Iterable[str] | None = None,
        timeout: float | None = None,
    ) -> EmulatedCall:
        """An answered call whose TwiML is ``<Connect><Stream url=ws_url>`` with these parameters."""
        _require_loopback_url(ws_url)
        call = self._new_call(from_=from_, to=to, direction=direction, status="ringing")
        call.caller_audio = audio
        call._stream_signature = signature
        call.status_callback = status_callback or self.status_callback_url
        events = status_callback_events if status_callback_events is not None else self.status_callback_events
        call.status_callback_events = set(events)
        response = ET.Element("Response")
        stream_el = ET.SubElement(ET.SubElement(response, "Connect"), "Stream", {"url": ws_url})
        for name, value in (custom_parameters or {}).items():
            ET.SubElement(stream_el, "Parameter", {"name": name, "value": value})
        twiml = ET.tostring(response, encoding="unicode")
        call._runner = self._spawn(
            self._run_document(call, twiml=twiml, url=None), name=f"twilio-emu-stream-{call.sid}"
        )
        await self._wait_settled(call, timeout)
        return call

    async def _wait_settled(self, call: EmulatedCall, timeout: float | None) -> None:
        if timeout is None:
            timeout = self.webhook_timeout + self.stream_open_timeout + 1.0
        async with asyncio.timeout(timeout):
            await call._settled.wait()

    async def wait_for_call(
        self, timeout: float | None = None, *, direction: str | None = None
    ) -> EmulatedCall:
        """The most recent call (optionally of a direction), waiting for one to exist."""
        async with asyncio.timeout(timeout):
            while True:
                for call in reversed(list(self.calls.values())):
                    if direction is None or call.direction == direction:
                        return call
                future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._call_waiters.append(future)
                try:
                    await future
                finally:
                    with contextlib.suppress(ValueError):
                        self._call_waiters.remove(future)

    # ---- HTTP requests to the application

    def _webhook_params(self, call: EmulatedCall, call_status: str) -> dict[str, str]:
        return {
            "AccountSid": self.account_sid,
            "ApiVersion": API_VERSION,
            "CallSid": call.sid,
            "CallStatus": call_status,
            "Called": call.to,
            "Caller": call.from_,
            "Direction": call.direction,
            "From": call.from_,
            "To": call.to,
        }

    async def _signed_request(
        self,
        kind: str,
        call: EmulatedCall,
        url: str,
        method: str,
        params: dict[str, str],
        signature: str | None = None,
    ) -> WebhookRecord:
        assert self._http is not None
        method = method.upper()
        if method == "GET":
            # With GET the parameters are in the URL, and the signature covers that full URL.
            target = url + ("&" if "?" in url else "?") + urlencode(params)
            signed = twilio_signature(self.auth_token, target)
        else:
            target = url
            signed = twilio_signature(self.auth_token, url, params)
        if signature is None and self.sign_requests:
            signature = signed
        headers = {
            "User-Agent": "TwilioProxy/1.1",
            "Accept": "*/*",
            "I-Twilio-Idempotency-Token": str(uuid.uuid4()),
        }
        if signature is not None:
            headers["X-Twilio-Signature"] = signature
        record = WebhookRecord(
            time=asyncio.get_running_loop().time(),
            kind=kind,
            call_sid=call.sid,
            method=method,
            url=url,
            params=params,
            signature=signature,
            status_code=None,
        )
        self.webhooks.append(record)
        try:
            _require_loopback_url(url)
            if method == "GET":
                response = await self._http.get(target, headers=headers)
            else:
                response = await self._http.post(target, data=params, headers=headers)
            record.status_code = response.status_code
            record.body = response.text
        except (httpx.HTTPError, ValueError) as exc:
            record.error = f"{type(exc).__name__}: {exc}"
        return record

    async def _fetch_twiml(
        self, call: EmulatedCall, url: str, method: str, *, signature: str | None = None
    ) -> str | None:
        call_status = "ringing" if call.status in ("queued", "ringing") else call.status
        record = await self._signed_request(
            "voice", call, url, method, self._webhook_params(call, call_status), signature
        )
        if record.status_code is None or not 200 <= record.status_code < 300:
            call.twiml_errors.append(f"webhook {url} answered {record.status_code or record.error}")
            return None
        return record.body

    def _emit_status_callback(self, call: EmulatedCall, event: str) -> None:
        url = call.status_callback
        if not url or event not in call.status_callback_events:
            return
        params = self._webhook_params(call, "initiated" if event == "initiated" else call.status)
        params.update(
            {
                "CallbackSource": "call-progress-events",
                "SequenceNumber": str(call._callback_seq),
                "Timestamp": _rfc2822(_utcnow()) or "",
            }
        )
        if event == "completed":
            params["CallDuration"] = str(call.duration or 0)
        call._callback_seq += 1
        previous = call._callback_chain
        task = self._spawn(
            self._deliver_status_callback(call, url, params, previous), name=f"twilio-emu-callback-{call.sid}"
        )
        self._callback_tasks.add(task)
        call._callback_chain = task

    async def _deliver_status_callback(
        self, call: EmulatedCall, url: str, params: dict[str, str], previous: asyncio.Task[None] | None
    ) -> None:
        # One call's callbacks go out in order, each after the previous one was answered.
        if previous is not None and not previous.done():
            await asyncio.wait({previous})
        await self._signed_request("status", call, url, call.status_callback_method, params)
        call.status_callbacks_sent.append(params)
