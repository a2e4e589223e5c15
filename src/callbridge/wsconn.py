"""A WebSocket connection on `asyncio.Protocol`, for both legs' hot paths.

Each leg carries many small messages: 50 caller frames a second per call on the
carrier's leg, one per frame (and a media + mark pair per agent chunk) on the agent's.
The `websockets` library's asyncio connections, and uvicorn's sans-I/O glue, spend per
message a lock, a queue, a few awaits, a pause/resume of reading and a generator-based
frame parser: in bench/ that machinery was most of a bridge's CPU.

`WSConnection` keeps the library's sans-I/O protocol (`ClientProtocol` or
`ServerProtocol`) for everything that must be right: the opening handshake and its
checks, pings, the closing handshake, close codes, and every frame that is not a plain
one: fragments, reserved bits, wrong masking, oversized frames, control frames. Only the
common case is handled here, inside `data_received`: a complete, unfragmented text or
binary frame within the size limit is unmasked (the library's C `apply_mask`) and queued
for `recv()` with no task, queue or await. Control frames are handed whole to the
library, so its parser always stands at a frame boundary; anything unusual hands the rest
of the stream to the library for good ("slow mode"), which then refuses it with the
right close code. Messages are written at once, framed here.

Errors are the library's own (`ConnectionClosed` with the close frames received and sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable

from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import Protocol, State

try:
    from websockets.speedups import apply_mask  # the library's C masking
except ImportError:  # pragma: no cover - the pure-Python fallback of the library
    from websockets.utils import apply_mask

__all__ = ["WSConnection", "frame_bytes"]

log = logging.getLogger("callbridge.ws")

# Mask keys must be unpredictable (RFC 6455 section 5.3); they are cut from one read of the
# system's CSPRNG per 1024 frames instead of one system call per frame.
_KEY_BLOCK = 4096
_MAX_QUEUE = 64  # messages received and not yet read before reading from the socket pauses


class _Keys:
    def __init__(self) -> None:
        self._block = b""
        self._pos = _KEY_BLOCK

    def next(self) -> bytes:
        if self._pos >= _KEY_BLOCK:
            self._block = os.urandom(_KEY_BLOCK)
            self._pos = 0
        key = self._block[self._pos : self._pos + 4]
        self._pos += 4
        return key


_keys = _Keys()


def frame_bytes(payload: bytes, masked: bool, opcode: int = 0x1) -> bytes:
    """One final frame (text by default): masked from a client, plain from a server."""
    n = len(payload)
    first = 0x80 | opcode
    bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((first, bit | n))
    elif n < 65536:
        head = bytes((first, bit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, bit | 127)) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    key = _keys.next()
    return head + key + apply_mask(payload, key)


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


class WSConnection(asyncio.Protocol):
    """One WebSocket connection, either side. Subclasses do the opening handshake."""

    def __init__(
        self,
        protocol: Protocol,
        close_timeout: float,
        ping_interval: float | None,
        ping_timeout: float | None,
        max_size: int | None,
    ) -> None:
        self.protocol = protocol
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self._loop = asyncio.get_running_loop()
        self._close_timeout = close_timeout
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._max_size = max_size if max_size is not None else 1 << 62
        # A client masks what it sends and reads plain frames; a server the other way round.
        self._mask_out = protocol.side.name == "CLIENT"
        self._messages: deque[str | bytes] = deque()
        self._fragments: list[bytes] = []
        self._fragment_op: Opcode | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._handshake: asyncio.Future[None] = self._loop.create_future()
        # A handshake abandoned before anyone awaits it (a Ctrl-C during the connect) leaves
        # nobody to read its failure: read it here, so asyncio does not log "Future exception
        # was never retrieved".
        self._handshake.add_done_callback(_retrieve)
        self._lost: asyncio.Future[None] = self._loop.create_future()
        self._fast = False  # frames parsed here (True once open) or all by the library
        self._failed = False  # we failed the connection: nothing more is delivered
        self._buf = b""
        self._reading_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._writing_paused = False
        self._abort_handle: asyncio.TimerHandle | None = None
        self._ping_handle: asyncio.TimerHandle | None = None
        self._pong_deadline: asyncio.TimerHandle | None = None
        self._ping_data: bytes | None = None
        # Takes a text message as it is parsed, when nothing is queued before it; True: taken,
        # not queued for recv() (a call forwards plain caller audio this way: no task wakes).
        self.on_text: Callable[[str], bool] | None = None

    # -- reading and writing messages -------------------------------------------------

    async def recv(self) -> str | bytes:
        """The next message; raises `ConnectionClosed` once the connection is closed."""
        while not self._messages:
            if self._lost.done():
                raise self.protocol.close_exc
            waiter = self._loop.create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None
        message = self._messages.popleft()
        if self._reading_paused and len(self._messages) <= _MAX_QUEUE // 4:
            self._reading_paused = False
            self.transport.resume_reading()
        return message

    async def send(self, text: str) -> None:
        """Send one text message; raises `ConnectionClosed` if the connection is closing."""
        if self.protocol.state is not State.OPEN:
            await self._closed()
        self.transport.write(frame_bytes(text.encode(), self._mask_out))
        if self._writing_paused:
            await self._wait_drain()

    def send_now(self, text: str) -> bool:
        """Send one text message now if that needs no wait: False if the connection is not
        open or its writes are paused (the caller then sends it with `send`)."""
        if self.protocol.state is not State.OPEN or self._writing_paused:
            return False
        self.transport.write(frame_bytes(text.encode(), self._mask_out))
        return True

    async def send_bytes(self, data: bytes) -> None:
        """Send one binary message; raises `ConnectionClosed` if the connection is closing."""
        if self.protocol.state is not State.OPEN:
            await self._closed()
        self.transport.write(frame_bytes(data, self._mask_out, 0x2))
        if self._writing_paused:
            await self._wait_drain()

    async def send_many(self, texts: Iterable[str]) -> None:
        """Send text messages in one write (e.g. an audio chunk and its mark)."""
        if self.protocol.state is not State.OPEN:
            await self._closed()
        mask = self._mask_out
        self.transport.write(b"".join([frame_bytes(text.encode(), mask) for text in texts]))
        if self._writing_paused:
            await self._wait_drain()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """The closing handshake, bounded by the close timeout; then the TCP connection is closed."""
        self.start_close(code, reason)
        await self._until_lost(self._close_timeout)

    def start_close(self, code: int = 1000, reason: str = "") -> None:
        """Send the close frame (if open) and arm the close timer; do not wait."""
        if self.protocol.state is State.OPEN:
            self._go_slow()
            self.protocol.send_close(code, reason)
            self._flush()

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._fast:
            self._parse(data)
        else:
            self.protocol.receive_data(data)
            self._process()

    def eof_received(self) -> bool | None:
        self._go_slow()
        self.protocol.receive_eof()
        self._process()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._fast = False
        self.protocol.receive_eof()  # idempotent; the protocol is CLOSED after it
        for handle in (self._abort_handle, self._ping_handle, self._pong_deadline):
            if handle is not None:
                handle.cancel()
        if not self._handshake.done():
            self._handshake.set_exception(exc or ConnectionError("connection closed during the handshake"))
        if not self._lost.done():
            self._lost.set_result(None)
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- the fast path -------------------------------------------------------------------

    def _go_fast(self) -> None:
        """Parse frames here from now on, if the library holds no partial frame."""
        reader = getattr(self.protocol, "reader", None)
        if self.protocol.state is State.OPEN and reader is not None and not getattr(reader, "buffer", True):
            self._fast = True

    def _go_slow(self) -> None:
        """Hand what is buffered, and everything after it, to the library."""
        if self._fast:
            self._slow_from(self._buf, 0)

    def _parse(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        n = len(buf)
        pos = 0
        unmask = not self._mask_out  # frames from a client are masked
        while n - pos >= 2:
            first = buf[pos]
            second = buf[pos + 1]
            length = second & 0x7F
            head = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                head = 4
            elif length == 127:
                self._slow_from(buf, pos)
                return
            if bool(second & 0x80) is not unmask:
                self._slow_from(buf, pos)  # the library refuses it (1002)
                return
            start = pos + head + (4 if unmask else 0)
            end = start + length
            if first == 0x81 or first == 0x82:
                if length > self._max_size:
                    self._slow_from(buf, pos)  # the library refuses it (1009)
                    return
                if end > n:
                    break
                payload = buf[start:end]
                if unmask:
                    payload = apply_mask(payload, buf[start - 4 : start])
                if first == 0x81:
                    try:
                        text = payload.decode()
                    except UnicodeDecodeError:
                        self._invalid_utf8()
                        return
                    if self.on_text is not None and not self._messages and self._offer(text):
                        pos = end
                        continue
                    self._messages.append(text)
                else:
                    self._messages.append(self._binary(payload))
                self._wake()
            elif 0x88 <= first <= 0x8A and length <= 125:
                if end > n:
                    break
                # A whole control frame: the library answers pings and closes.
                self.protocol.receive_data(buf[pos:end])
                self._process()
                if self.protocol.state is not State.OPEN:
                    self._slow_from(buf, end)  # closing: the rest is the library's
                    return
            else:
                self._slow_from(buf, pos)  # fragments, reserved bits, bad opcodes
                return
            pos = end
        self._buf = buf[pos:] if pos < n else b""
        if len(self._messages) >= _MAX_QUEUE and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def _offer(self, text: str) -> bool:
        """`on_text`'s answer; a handler that raises is dropped (logged) and `recv()` gets all."""
        assert self.on_text is not None
        try:
            return self.on_text(text)
        except Exception:
            log.exception("message handler failed; every message goes to recv() from now on")
            self.on_text = None
            return False

    def _slow_from(self, buf: bytes, pos: int) -> None:
        """From `buf[pos:]` on, every byte goes to the library."""
        self._fast = False
        self._buf = b""
        if pos < len(buf):
            self.protocol.receive_data(buf[pos:])
            self._process()

    def _invalid_utf8(self) -> None:
        """A text message that is not UTF-8 fails the connection (1007), in either mode, and
        nothing received after it is delivered (RFC 6455 7.1.7)."""
        self._failed = True
        self._fast = False
        self._buf = b""
        self.protocol.fail(CloseCode.INVALID_DATA, "invalid UTF-8 in a text message")
        self._flush()

    # -- the library's events ----------------------------------------------------------

    def _process(self) -> None:
        for event in self.protocol.events_received():
            if isinstance(event, Frame):
                self._frame(event)
            elif isinstance(event, Request | Response):
                self._handshake_event(event)
        self._flush()
        if len(self._messages) >= _MAX_QUEUE and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def _handshake_event(self, event: Request | Response) -> None:
        """The peer's side of the opening handshake (a subclass acts on it)."""

    def _frame(self, frame: Frame) -> None:
        if self._failed:
            return  # frames parsed after the one that failed the connection (RFC 6455 7.1.7)
        op = frame.opcode
        if op is Opcode.TEXT or op is Opcode.BINARY:
            if frame.fin:
                self._message(op, frame.data)
            else:
                self._fragment_op, self._fragments = op, [bytes(frame.data)]
        elif op is Opcode.CONT:
            self._fragments.append(bytes(frame.data))
            if frame.fin and self._fragment_op is not None:
                data = b"".join(self._fragments)
                op, self._fragment_op, self._fragments = self._fragment_op, None, []
                self._message(op, data)
        elif op is Opcode.PONG:
            if self._ping_data is not None and frame.data == self._ping_data:
                self._ping_data = None
                if self._pong_deadline is not None:
                    self._pong_deadline.cancel()
                    self._pong_deadline = None
        elif op is Opcode.CLOSE:
            self._wake()

    def _message(self, op: Opcode, data: bytes | bytearray | memoryview) -> None:
        if op is not Opcode.TEXT:
            self._messages.append(self._binary(bytes(data)))
            self._wake()
            return
        try:
            text = bytes(data).decode()
        except UnicodeDecodeError:
            self._invalid_utf8()
            return
        self._messages.append(text)
        self._wake()

    def _binary(self, data: bytes) -> str | bytes:
        """A binary message as it is handed to `recv()`."""
        return data

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _flush(self) -> None:
        """Write what the protocol has to send; start the close timer when a TCP close is due."""
        for data in self.protocol.data_to_send():
            if data:
                self.transport.write(data)
            elif self.transport.can_write_eof():
                self.transport.write_eof()
        if self.protocol.close_expected() and self._abort_handle is None:
            self._abort_handle = self._loop.call_later(self._close_timeout, self.transport.abort)

    async def _closed(self) -> None:
        """Wait for a closing connection to be closed, then raise how it closed."""
        # The close timer (`_flush`) aborts it after the close timeout; this bound is a backstop.
        await self._until_lost(self._close_timeout + 1.0)
        raise self.protocol.close_exc

    async def _until_lost(self, timeout: float) -> None:
        """Wait up to `timeout` for the TCP connection to close; then abort it."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._lost)
        if not self._lost.done():
            self.transport.abort()
            await self._lost

    async def _wait_drain(self) -> None:
        if self._drain is None or self._drain.done():
            self._drain = self._loop.create_future()
        await self._drain
        if self._lost.done():
            raise self.protocol.close_exc

    def _start_keepalive(self) -> None:
        if self._ping_interval is not None:
            self._ping_handle = self._loop.call_later(self._ping_interval, self._ping)

    def _ping(self) -> None:
        if self.protocol.state is not State.OPEN:
            return
        if self._ping_data is None:
            self._ping_data = os.urandom(4)
            self.protocol.send_ping(self._ping_data)
            self._flush()
            if self._ping_timeout is not None:
                self._pong_deadline = self._loop.call_later(self._ping_timeout, self._ping_timed_out)
        assert self._ping_interval is not None
        self._ping_handle = self._loop.call_later(self._ping_interval, self._ping)

    def _ping_timed_out(self) -> None:
        self._pong_deadline = None
        if self.protocol.state is State.OPEN:
            self._go_slow()
            self.protocol.fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
            self._flush()
            self._wake()
