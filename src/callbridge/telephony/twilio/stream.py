"""Twilio Media Stream adapter: a `TelephonyLeg` over one server-side WebSocket."""

from __future__ import annotations

import asyncio
import base64
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from callbridge.telephony.base import (
    CallerAudio,
    CallerHungUp,
    StreamInfo,
    TelephonyClosed,
    TelephonyError,
    TelephonyEvent,
    TelephonyWarning,
)
from callbridge.telephony.twilio.params import read_stream_parameters
from callbridge.telephony.twilio.protocol import Connected, TwilioStreamProtocol
from callbridge.transport import MessageSocket, SocketClosed

__all__ = ["StreamValidator", "TwilioMediaStream"]

# Checks a stream's start (e.g. the per-call token): why it is refused, or None.
StreamValidator = Callable[[StreamInfo], str | Awaitable[str | None] | None]

log = logging.getLogger("callbridge.twilio")


class TwilioMediaStream:
    """One bidirectional Media Stream (`<Connect><Stream>`), seen from our server."""

    def __init__(
        self,
        socket: MessageSocket,
        close_timeout: float = 2.0,
        validator: StreamValidator | None = None,
    ) -> None:
        self._socket = socket
        # Checks the start (e.g. our per-call token); returns why the stream is refused.
        self._validator = validator
        self.protocol = TwilioStreamProtocol()
        self._open = True
        self._closed_by_bridge = False
        self._close_timeout = close_timeout
        self.early_warnings: list[str] = []
        self.media_sent = 0

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def pending_marks(self) -> int:
        return self.protocol.pending_marks

    async def start(self) -> StreamInfo:
        """Read `connected` and `start`; anything else before `start` is noted and skipped."""
        while True:
            try:
                frame = await self._socket.receive()
            except SocketClosed as exc:
                self._open = False
                raise TelephonyError(f"media stream closed before start ({exc.code})") from None
            event = self.protocol.receive(frame)
            if isinstance(event, StreamInfo):
                event = read_stream_parameters(event)
                problem = self._validator(event) if self._validator is not None else None
                if inspect.isawaitable(problem):
                    problem = await problem
                if problem is not None:
                    await self._refuse(problem)
                return event
            if isinstance(event, Connected) or event is None:
                continue
            if isinstance(event, CallerHungUp):
                raise TelephonyError("stop before start")
            if isinstance(event, TelephonyWarning):
                if event.fatal:
                    raise TelephonyError(event.reason)
                self.early_warnings.append(event.reason)
                continue
            self.early_warnings.append(f"{type(event).__name__} before start")

    async def _refuse(self, problem: str) -> None:
        self._closed_by_bridge = True
        self._open = False
        try:
            async with asyncio.timeout(self._close_timeout):
                await self._socket.close(1008, "stream refused")
        except TimeoutError:
            pass
        raise TelephonyError(f"media stream refused: {problem}")

    async def events(self) -> AsyncIterator[TelephonyEvent]:
        receive = self._socket.receive
        parse = self.protocol.receive
        while True:
            try:
                frame = await receive()
            except SocketClosed as exc:
                self._open = False
                yield TelephonyClosed(exc.code, self._closed_by_bridge, exc.reason)
                return
            event = parse(frame)
            if event is None or isinstance(event, Connected | StreamInfo):
                if isinstance(event, Connected):
                    yield TelephonyWarning("connected received after start")
                continue
            yield event

    def set_audio_fast_path(self, take: Callable[[CallerAudio], bool]) -> bool:
        """Offer plain caller audio to `take` as soon as it is read, on sockets that can
        (`on_text`, see wsconn.py): what it takes (True) is not yielded by `events()`.
        Anything else, and whatever arrives behind a message not yet read, is yielded as
        before. False if this socket cannot."""
        if not hasattr(self._socket, "on_text"):
            return False
        caller_audio = self.protocol.caller_audio

        def offer(text: str) -> bool:
            audio = caller_audio(text)
            return audio is not None and take(audio)

        self._socket.on_text = offer
        return True

    async def send_audio(self, ulaw: bytes, b64: str | None = None) -> None:
        if not self._open:
            return
        if b64 is None:
            b64 = base64.b64encode(ulaw).decode("ascii")
        mark_frame, _ = self.protocol.mark()
        try:
            await self._socket.send_many((self.protocol.media(b64), mark_frame))
        except SocketClosed:
            self._open = False
        self.media_sent += 1

    async def clear(self) -> None:
        if not self._open:
            return
        try:
            await self._socket.send(self.protocol.clear())
        except SocketClosed:
            self._open = False

    async def close(self) -> None:
        if not self._open and self._closed_by_bridge:
            return
        self._closed_by_bridge = True
        self._open = False
        try:
            async with asyncio.timeout(self._close_timeout):
                await self._socket.close(1000, "call ended")
        except TimeoutError:
            log.warning("closing the Twilio media stream timed out")
