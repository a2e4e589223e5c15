"""A WebSocket client connection for the agent leg, on `asyncio.Protocol`.

The agent leg carries one message per caller frame (50 a second per call). The
`websockets` library's asyncio connection spends, per message, an async context manager,
a lock, a queue and a few awaits around the socket write, and a `getrandom` system call
for each frame's mask key: in bench/ that per-message machinery was close to half of a
bridge's CPU. This connection keeps the library's sans-I/O `ClientProtocol` for everything
that must be right (the opening handshake and its checks, frame parsing, size limits,
fragmentation rules, pings, the closing handshake, close codes) and does only the hot
path itself: a text message is framed and masked here and written at once; frames
received are parsed inside `data_received` and queued for `recv()`.

The interface is the subset of `websockets.asyncio.client.ClientConnection` the session
uses: `recv()`, `send()`, `close()`, `transport`; errors are the library's own
(`ConnectionClosed` with the close frames received and sent, `InvalidStatus`, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl as ssl_module
from collections import deque

from websockets.client import ClientProtocol
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

try:
    from websockets.speedups import apply_mask  # the library's C masking
except ImportError:  # pragma: no cover - the pure-Python fallback of the library
    from websockets.utils import apply_mask

__all__ = ["AgentSocket", "connect"]

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


def _text_frame(payload: bytes) -> bytes:
    """One masked, final text frame (client to server)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x81, 0x80 | n))
    elif n < 65536:
        head = bytes((0x81, 0xFE)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x81, 0xFF)) + n.to_bytes(8, "big")
    key = _keys.next()
    return head + key + apply_mask(payload, key)


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


class AgentSocket(asyncio.Protocol):
    """One client WebSocket connection. Created by :func:`connect`."""

    def __init__(
        self,
        protocol: ClientProtocol,
        close_timeout: float,
        ping_interval: float | None,
        ping_timeout: float | None,
    ) -> None:
        self.protocol = protocol
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self._loop = asyncio.get_running_loop()
        self._close_timeout = close_timeout
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._messages: deque[str] = deque()
        self._fragments: list[bytes] = []
        self._fragment_op: Opcode | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._handshake: asyncio.Future[None] = self._loop.create_future()
        # A connect cancelled before it awaits the handshake (a Ctrl-C during
        # create_connection) leaves nobody to read its failure: read it here, so asyncio
        # does not log "Future exception was never retrieved".
        self._handshake.add_done_callback(_retrieve)
        self._lost: asyncio.Future[None] = self._loop.create_future()
        self._reading_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._writing_paused = False
        self._abort_handle: asyncio.TimerHandle | None = None
        self._ping_handle: asyncio.TimerHandle | None = None
        self._pong_deadline: asyncio.TimerHandle | None = None
        self._ping_data: bytes | None = None

    # -- the session's interface -------------------------------------------------------

    async def recv(self) -> str:
        """The next text message; raises `ConnectionClosed` once the connection is closed."""
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
        self.transport.write(_text_frame(text.encode()))
        if self._writing_paused:
            await self._wait_drain()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """The closing handshake, bounded by the close timeout; then the TCP connection is closed."""
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(code, reason)
            self._flush()
        await self._until_lost(self._close_timeout)

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.protocol.receive_data(data)
        self._process()

    def eof_received(self) -> bool | None:
        self.protocol.receive_eof()
        self._process()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
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

    # -- internals --------------------------------------------------------------------

    def _process(self) -> None:
        for event in self.protocol.events_received():
            if isinstance(event, Frame):
                self._frame(event)
            elif isinstance(event, Response) and not self._handshake.done():
                self._handshake.set_result(None)
        self._flush()
        if len(self._messages) >= _MAX_QUEUE and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def _frame(self, frame: Frame) -> None:
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
            # The agent protocol is JSON text; a binary message is handed on as text for the
            # protocol layer to reject with a readable warning.
            self._messages.append(bytes(data).decode("utf-8", "replace"))
            self._wake()
            return
        try:
            text = bytes(data).decode()
        except UnicodeDecodeError:
            self.protocol.fail(CloseCode.INVALID_DATA, "invalid UTF-8 in a text message")
            return
        self._messages.append(text)
        self._wake()

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
            await asyncio.wait_for(asyncio.shield(self._lost), timeout)
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
            self.protocol.fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
            self._flush()
            self._wake()


async def connect(
    url: str,
    *,
    max_size: int | None,
    close_timeout: float,
    user_agent: str,
    ping_interval: float | None = 20.0,
    ping_timeout: float | None = 20.0,
) -> AgentSocket:
    """Open a client connection to `url` (ws:// or wss://) and complete the opening handshake.

    Raises what `websockets.connect` raises: `InvalidStatus` for a non-101 answer, other
    `InvalidHandshake` errors, `InvalidURI`, `OSError`.
    """
    uri = parse_uri(url)
    protocol = ClientProtocol(uri, max_size=max_size)
    loop = asyncio.get_running_loop()
    conn = AgentSocket(protocol, close_timeout, ping_interval, ping_timeout)
    context = ssl_module.create_default_context() if uri.secure else None
    await loop.create_connection(
        lambda: conn, uri.host, uri.port, ssl=context, server_hostname=uri.host if context else None
    )
    try:
        request = protocol.connect()
        request.headers["User-Agent"] = user_agent
        protocol.send_request(request)
        conn._flush()
        await conn._handshake
        if protocol.handshake_exc is not None:
            raise protocol.handshake_exc
    except BaseException:
        conn.transport.abort()
        raise
    conn._start_keepalive()
    return conn
