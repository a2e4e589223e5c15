"""The one thing adapters need from a server-side WebSocket: text frames in and out.

The media-stream route may run on uvicorn/Starlette (the server) or on a plain
`websockets` server (tests, benchmarks); both are wrapped to `MessageSocket`.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

from websockets.asyncio.connection import Connection
from websockets.exceptions import ConnectionClosed

__all__ = ["MessageSocket", "SocketClosed", "WebsocketsSocket"]


class SocketClosed(Exception):
    """The peer is gone. `code` None means the connection dropped with no close frame."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"socket closed ({code}) {reason}".strip())
        self.code = code
        self.reason = reason


class MessageSocket(Protocol):
    async def receive(self) -> str | bytes:
        """The next frame; raises `SocketClosed` once the connection is over."""
        ...

    async def send(self, text: str) -> None:
        """Send a text frame; raises `SocketClosed` if the connection is over."""
        ...

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close if open; idempotent; never raises."""
        ...


def closed_from(exc: ConnectionClosed) -> SocketClosed:
    """Map a `websockets` closure to ours: the code the peer sent, None if it sent none."""
    if exc.rcvd is not None:
        return SocketClosed(exc.rcvd.code, exc.rcvd.reason)
    if exc.sent is not None:
        # We closed first and the peer never answered: report our own code.
        return SocketClosed(exc.sent.code, exc.sent.reason)
    return SocketClosed(None, "connection lost")


class WebsocketsSocket:
    """`MessageSocket` over a `websockets` (new asyncio API) connection."""

    def __init__(self, connection: Connection, close_timeout: float = 2.0) -> None:
        self._conn = connection
        self._close_timeout = close_timeout

    async def receive(self) -> str | bytes:
        try:
            return await self._conn.recv()
        except ConnectionClosed as exc:
            raise closed_from(exc) from None

    async def send(self, text: str) -> None:
        try:
            await self._conn.send(text)
        except ConnectionClosed as exc:
            raise closed_from(exc) from None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        try:
            await asyncio.wait_for(self._conn.close(code, reason), self._close_timeout)
        except (TimeoutError, OSError, ConnectionClosed):
            pass
        finally:
            # After a clean close this is a no-op; after a timeout it frees the socket now.
            with contextlib.suppress(Exception):
                self._conn.transport.abort()
