"""The caller's audio on a media stream: what it says, and how it hears the application.

:class:`CallerVoice` hands out the caller's speech 20 ms at a time, then silence.
:class:`Playback` is the earpiece: audio plays at 8000 bytes/s in frames of up to 20 ms; a
``mark`` is echoed when the audio queued before it has played; ``clear`` drops what has not
played and echoes the pending marks at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from callbridge.emulators.twilio.wire import BYTES_PER_SECOND, FRAME_BYTES, MULAW_SILENCE

__all__ = ["CallerVoice", "Playback"]


class CallerVoice:
    """The caller's speech still to be sent; ``done`` is set while none is left."""

    def __init__(self, audio: bytes) -> None:
        self.done = asyncio.Event()
        self.replace(audio)

    def replace(self, audio: bytes) -> None:
        self._speech = bytearray(audio)
        if audio:
            self.done.clear()
        else:
            self.done.set()

    def add(self, audio: bytes) -> None:
        if audio:
            self._speech += audio
            self.done.clear()

    def next_frame(self) -> bytes:
        """The next 20 ms: speech (padded with silence), or silence once it has run out."""
        if not self._speech:
            return bytes([MULAW_SILENCE]) * FRAME_BYTES
        frame = bytes(self._speech[:FRAME_BYTES])
        del self._speech[:FRAME_BYTES]
        if not self._speech:
            self.done.set()
        return frame.ljust(FRAME_BYTES, bytes([MULAW_SILENCE]))


@dataclass
class _PendingMark:
    name: str


class Playback:
    """Plays queued audio in real time; ``echo_mark(name, cleared)`` sends a mark back."""

    def __init__(self, echo_mark: Callable[[str, bool], Awaitable[None]]) -> None:
        self._echo_mark = echo_mark
        self.played_audio = bytearray()
        self.cleared_audio_bytes = 0
        self.last_audio_played_at: float | None = None
        self._queue: deque[bytes | _PendingMark] = deque()
        self._wake = asyncio.Event()
        self._clear_interrupt = asyncio.Event()
        self._generation = 0
        self._current_frame = b""

    @property
    def buffered_bytes(self) -> int:
        """Audio received but not yet played."""
        queued = sum(len(item) for item in self._queue if isinstance(item, bytes))
        return queued + len(self._current_frame)

    def add_audio(self, audio: bytes) -> None:
        self._queue.append(audio)
        self._wake.set()

    def add_mark(self, name: str) -> None:
        self._queue.append(_PendingMark(name))
        self._wake.set()

    async def clear(self) -> None:
        """Drop the audio not yet played (the frame playing too); echo the pending marks, cleared."""
        self._generation += 1
        pending_marks: list[str] = []
        cleared = len(self._current_frame)
        self._current_frame = b""
        for item in self._queue:
            if isinstance(item, _PendingMark):
                pending_marks.append(item.name)
            else:
                cleared += len(item)
        self._queue.clear()
        self.cleared_audio_bytes += cleared
        self._clear_interrupt.set()
        for name in pending_marks:
            await self._echo_mark(name, True)

    def _take_frame(self) -> bytes:
        # Up to 20 ms of consecutive audio; a mark in the queue ends the frame early.
        frame = bytearray()
        while self._queue and len(frame) < FRAME_BYTES:
            head = self._queue[0]
            if isinstance(head, _PendingMark):
                break
            need = FRAME_BYTES - len(frame)
            frame += head[:need]
            if len(head) > need:
                self._queue[0] = head[need:]
            else:
                self._queue.popleft()
        return bytes(frame)

    async def run(self) -> None:
        """Play until cancelled."""
        loop = asyncio.get_running_loop()
        line_free_at = loop.time()
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            head = self._queue[0]
            if isinstance(head, _PendingMark):
                self._queue.popleft()
                await self._echo_mark(head.name, False)
                continue
            frame = self._take_frame()
            # Back-to-back frames are scheduled from the previous frame's end, so no drift.
            ends_at = max(line_free_at, loop.time()) + len(frame) / BYTES_PER_SECOND
            generation = self._generation
            self._current_frame = frame
            self._clear_interrupt.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(ends_at):
                    await self._clear_interrupt.wait()
            if generation != self._generation:
                line_free_at = loop.time()  # the clear already counted this frame as cleared
                continue
            self._current_frame = b""
            self.played_audio += frame
            self.last_audio_played_at = ends_at
            line_free_at = ends_at
