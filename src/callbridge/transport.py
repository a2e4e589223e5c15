"""The one thing adapters need from a server-side WebSocket: text frames in and out.

The media-stream route runs on `wsserver.ServerSocket` (under uvicorn, or on its own
listening socket for the library, tests and benchmarks); a Starlette WebSocket is wrapped
to the same interface (webhooks.py) for an app served another way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from websockets.exceptions import ConnectionClosed

__all__ = ["DIRECT_SOCKET", "DirectSocket", "MessageSocket", "SocketClosed", "closed_from"]

# The ASGI scope extension under which a server offers its connection itself
# (`wsserver.ServerSocket`) instead of ASGI messages: server/wsroute.py sets it, the
# media-stream route uses it when present.
DIRECT_SOCKET = "callbridge.socket"


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

    async def send_many(self, texts: Sequence[str]) -> None:
        """Send text frames in order, in one write where the socket can."""
        ...

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close if open; idempotent; never raises."""
        ...


class DirectSocket(MessageSocket, Protocol):
    def accept(self) -> None:
        """Answer the upgrade request (101): the connection is open."""
        ...


def closed_from(exc: ConnectionClosed) -> SocketClosed:
    """Map a `websockets` closure to ours: the code the peer sent, None if it sent none."""
    if exc.rcvd is not None:
        return SocketClosed(exc.rcvd.code, exc.rcvd.reason)
    if exc.sent is not None:
        # We closed first and the peer never answered: report our own code.
        return SocketClosed(exc.sent.code, exc.sent.reason)
    return SocketClosed(None, "connection lost")
