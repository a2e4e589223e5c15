"""Twilio's side of one bidirectional media stream: a WebSocket client on loopback.

It sends ``connected``/``start`` and real-time paced ``media``, plays the application's audio
(:mod:`.playback`), echoes ``mark`` when the audio before it has played, honours ``clear``, and
ends the stream the way Twilio does (``stop`` then close) when the call ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from callbridge.emulators._common import (
    AsyncService,
    Waiters,
    cancel_and_wait,
    is_loopback_host,
    require_loopback_url,
)
from callbridge.emulators.twilio.caller_audio import CallerVoice, Playback
from callbridge.emulators.twilio.calls import DEFAULT_ACCOUNT_SID, new_sid
from callbridge.emulators.twilio.signing import twilio_signature
from callbridge.emulators.twilio.wire import (
    FRAME_SECONDS,
    connected_message,
    dtmf_message,
    mark_message,
    media_message,
    read_server_message,
    start_message,
    stop_message,
)

__all__ = ["MediaStreamCaller"]

log = logging.getLogger(__name__)

WHO = "the Twilio emulator"


class MediaStreamCaller(AsyncService):
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
        self.marks_echoed: list[tuple[float, str, bool]] = []
        self.clears: list[float] = []
        self.connected_at: float | None = None
        self.media_started_at: float | None = None
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
        self._voice = CallerVoice(audio)
        self.speech_done = self._voice.done  # the queued caller speech has all been sent

        # Hooks for the emulator's call; called synchronously.
        self.on_closed: Callable[[MediaStreamCaller], None] | None = None
        self.on_hangup: Callable[[MediaStreamCaller], None] | None = None

        self._progress = Waiters()
        self._ws: ClientConnection | None = None
        self._seq = 0
        self._send_lock = asyncio.Lock()
        self._no_more_sends = False
        self._closing_by: str | None = None
        self._playback = Playback(self._echo_mark)
        self._receive_task: asyncio.Task[None] | None = None
        self._media_task: asyncio.Task[None] | None = None
        self._playback_task: asyncio.Task[None] | None = None

    # ---- lifecycle

    async def _open(self) -> None:
        await self.connect()

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
            require_loopback_url(self.url, WHO)
            if self.connect_to is not None and not is_loopback_host(self.connect_to[0]):
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
            await self._send_unnumbered(connected_message())
            await self._send(
                start_message(self.account_sid, self.stream_sid, self.call_sid, self.custom_parameters)
            )
        except ConnectionClosed:
            pass
        self.started.set()
        self._receive_task = asyncio.create_task(
            self._receive_loop(), name=f"twilio-emu-recv-{self.stream_sid}"
        )
        self._media_task = asyncio.create_task(self._media_loop(), name=f"twilio-emu-media-{self.stream_sid}")
        self._playback_task = asyncio.create_task(
            self._playback.run(), name=f"twilio-emu-playback-{self.stream_sid}"
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
            await cancel_and_wait(task)
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
        await cancel_and_wait(self._media_task)
        if send_stop:
            with contextlib.suppress(ConnectionClosed):
                await self._send(stop_message(self.account_sid, self.call_sid, self.stream_sid), last=True)
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
        await cancel_and_wait(self._media_task)
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
        await self._send(dtmf_message(self.stream_sid, digit))

    def set_audio(self, audio: bytes) -> None:
        """Replace the caller speech still to be sent (silence follows when it runs out)."""
        self._voice.replace(audio)

    def say(self, audio: bytes) -> None:
        """Queue more caller speech after what is still pending."""
        self._voice.add(audio)

    # ---- views for assertions

    @property
    def buffered_audio_bytes(self) -> int:
        """Outbound audio received but not yet played."""
        return self._playback.buffered_bytes

    @property
    def played_audio(self) -> bytearray:
        """The application's audio that has played, in order."""
        return self._playback.played_audio

    @property
    def cleared_audio_bytes(self) -> int:
        """Audio dropped unplayed by ``clear``."""
        return self._playback.cleared_audio_bytes

    @property
    def last_audio_played_at(self) -> float | None:
        return self._playback.last_audio_played_at

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
                await self._progress.changed()

    async def wait_for_mark(self, name: str, timeout: float | None = None) -> tuple[float, str, bool]:
        """Wait until the mark ``name`` has been echoed; returns (time, name, cleared)."""
        await self.wait_until(lambda: any(entry[1] == name for entry in self.marks_echoed), timeout)
        return next(entry for entry in self.marks_echoed if entry[1] == name)

    # ---- internals: sending

    def _notify_progress(self) -> None:
        self._progress.wake()

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
                sent = await self._send(media_message(self.stream_sid, index, self._voice.next_frame()))
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
        read = read_server_message(message, stream_sid=self.stream_sid, started=self.started.is_set())
        if read.parsed is None:
            self.received.append((now, message))
        else:
            if read.event == "media":
                self.media_messages_received += 1
            if self.record_media or read.event != "media":
                self.received.append((now, read.parsed))
        if read.problem is not None:
            self._invalid(now, read.problem)
        elif read.event == "media":
            if read.audio:
                self._playback.add_audio(read.audio)
        elif read.event == "mark":
            self._playback.add_mark(read.mark)
        else:
            self.clears.append(now)
            await self._playback.clear()

    async def _echo_mark(self, name: str, cleared: bool) -> None:
        now = asyncio.get_running_loop().time()
        sent = False
        with contextlib.suppress(ConnectionClosed):
            sent = await self._send(mark_message(self.stream_sid, name))
        if sent:
            self.marks_echoed.append((now, name, cleared))
            if not cleared:
                self.last_mark_played_at = now
        self._notify_progress()

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
