"""A lean RFC 6455 WebSocket (text frames, ping/pong, close) on asyncio.Protocol.

The load generator runs hundreds of emulated calls and agents in one process per
side, and must not be the bottleneck it measures. The `websockets` library costs a
task, a queue and several awaits per message; here a frame is parsed inside
`data_received` and sent with one `transport.write`, with the receive time taken
once per read. On the wire it is an ordinary WebSocket: the client masks every
frame (random key, `websockets`' C `apply_mask`), the server does not; pings are
answered; closes are acknowledged; no extension is negotiated (offers of
permessage-deflate are declined, as the RFC allows).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from websockets.speedups import apply_mask  # type: ignore[import-untyped]

__all__ = ["WsClient", "WsConnection", "WsServer", "frame_bytes"]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_OP_CONT, _OP_TEXT, _OP_BIN, _OP_CLOSE, _OP_PING, _OP_PONG = 0, 1, 2, 8, 9, 10
MAX_MESSAGE = 4 << 20


# Masking keys: random, drawn once (the per-frame cost of drawing them showed in profiles).
_KEYS = [os.urandom(4) for _ in range(1024)]
_key_i = 0


def frame_bytes(payload: bytes, opcode: int = _OP_TEXT, mask: bool = False) -> bytes:
    """One complete (FIN) frame."""
    n = len(payload)
    b0 = 0x80 | opcode
    mbit = 0x80 if mask else 0
    if n < 126:
        head = bytes((b0, mbit | n))
    elif n < 65536:
        head = bytes((b0, mbit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, mbit | 127)) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    global _key_i
    _key_i = (_key_i + 1) & 1023
    key = _KEYS[_key_i]
    return head + key + apply_mask(payload, key)


class WsConnection(asyncio.Protocol):
    """One WebSocket connection after (or during) its HTTP upgrade."""

    is_client = False

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._upgraded = False
        self._fragments: list[bytes] = []
        self._frag_op = 0
        self.open = False
        self.close_sent = False
        self.close_code: int | None = None  # the code the peer sent; None if none
        self.closed_at: float | None = None
        self.closed = asyncio.get_running_loop().create_future()

    # -- for subclasses -----------------------------------------------------

    def on_open(self) -> None: ...

    def on_text(self, text: str, now: float) -> None: ...

    def on_closed(self) -> None: ...

    def handle_upgrade(self, head: bytes) -> bool:
        raise NotImplementedError

    # -- sending ------------------------------------------------------------

    def send_text(self, text: str) -> None:
        if self.open and not self.close_sent and self.transport is not None:
            self.transport.write(frame_bytes(text.encode(), _OP_TEXT, self.is_client))

    def close(self, code: int = 1000, reason: str = "") -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if not self.close_sent and self.open:
            self.close_sent = True
            body = code.to_bytes(2, "big") + reason.encode()[:120]
            self.transport.write(frame_bytes(body, _OP_CLOSE, self.is_client))
            # The server closes TCP after the close handshake; bound the wait for it.
            asyncio.get_running_loop().call_later(2.0, self.abort)
        elif not self.open:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    # -- asyncio.Protocol -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        was_open = self.open
        self.open = False
        self.closed_at = time.monotonic()
        if not self.closed.done():
            self.closed.set_result(None)
        if was_open or self._upgraded:
            self.on_closed()

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        buf = self._buf
        buf += data
        if not self._upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 16384:
                    self.abort()
                return
            head = bytes(buf[: end + 4])
            del buf[: end + 4]
            if not self.handle_upgrade(head):
                return
            self._upgraded = True
            self.open = True
            self.on_open()
        self._parse(now)

    def _parse(self, now: float) -> None:
        buf = self._buf
        pos = 0
        size = len(buf)
        while size - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            n = b1 & 0x7F
            p = pos + 2
            if n == 126:
                if size - p < 2:
                    break
                n = int.from_bytes(buf[p : p + 2], "big")
                p += 2
            elif n == 127:
                if size - p < 8:
                    break
                n = int.from_bytes(buf[p : p + 8], "big")
                p += 8
            key = None
            if b1 & 0x80:
                if size - p < 4:
                    break
                key = bytes(buf[p : p + 4])
                p += 4
            if n > MAX_MESSAGE:
                self.abort()
                return
            if size - p < n:
                break
            payload = bytes(buf[p : p + n])
            pos = p + n
            if key is not None:
                payload = apply_mask(payload, key)
            self._frame(b0, payload, now)
            if self.transport is None or self.transport.is_closing():
                break
        if pos:
            del buf[:pos]

    def _frame(self, b0: int, payload: bytes, now: float) -> None:
        op = b0 & 0x0F
        fin = b0 & 0x80
        if op == _OP_TEXT or op == _OP_BIN:
            if fin:
                if op == _OP_TEXT:
                    self.on_text(payload.decode(), now)
                return
            self._frag_op, self._fragments = op, [payload]
        elif op == _OP_CONT:
            self._fragments.append(payload)
            if fin:
                whole = b"".join(self._fragments)
                self._fragments = []
                if self._frag_op == _OP_TEXT:
                    self.on_text(whole.decode(), now)
        elif op == _OP_PING:
            if self.transport is not None and not self.close_sent:
                self.transport.write(frame_bytes(payload, _OP_PONG, self.is_client))
        elif op == _OP_CLOSE:
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            if not self.close_sent and self.transport is not None:
                self.close_sent = True
                self.transport.write(frame_bytes(payload[:2], _OP_CLOSE, self.is_client))
            self.open = False
            if self.transport is not None:
                if self.is_client:
                    # The server should close TCP first; do not wait for ever.
                    asyncio.get_running_loop().call_later(1.0, self.abort)
                else:
                    self.transport.close()


class WsServer(WsConnection):
    """Server side: answers the upgrade on any path; `path` keeps the request target."""

    is_client = False

    def __init__(self) -> None:
        super().__init__()
        self.path = ""
        self.headers: dict[str, str] = {}

    def handle_upgrade(self, head: bytes) -> bool:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        self.path = parts[1] if len(parts) > 1 else ""
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                self.headers[k.strip().lower()] = v.strip()
        key = self.headers.get("sec-websocket-key")
        assert self.transport is not None
        if not key or "websocket" not in self.headers.get("upgrade", "").lower():
            self.transport.write(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            self.transport.close()
            return False
        accept = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()
        self.transport.write(
            (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Accept: {accept}\r\n\r\n"
            ).encode()
        )
        return True


class WsClient(WsConnection):
    """Client side: sends the upgrade request on connect."""

    is_client = True

    def __init__(self, url: str, headers: dict[str, str] | None = None, user_agent: str = "leanws") -> None:
        super().__init__()
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._key = base64.b64encode(os.urandom(16)).decode()
        self._extra = headers or {}
        self._ua = user_agent
        self.handshake_failed: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        extra = "".join(f"{k}: {v}\r\n" for k, v in self._extra.items())
        assert self.transport is not None
        self.transport.write(
            (
                f"GET {self.target} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {self._key}\r\nSec-WebSocket-Version: 13\r\n"
                f"User-Agent: {self._ua}\r\n{extra}\r\n"
            ).encode()
        )

    def handle_upgrade(self, head: bytes) -> bool:
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            self.handshake_failed = status.decode("latin-1")
            assert self.transport is not None
            self.transport.close()
            return False
        return True


async def connect(factory: Callable[[], WsClient], host: str, port: int) -> WsClient:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(factory, host, port)
    return proto
