"""The agent leg's WebSocket client connection, on the shared `WSConnection`.

The interface is the subset of `websockets.asyncio.client.ClientConnection` the session
uses: `recv()`, `send()`, `close()`, `transport`; errors are the library's own
(`ConnectionClosed` with the close frames received and sent, `InvalidStatus`, ...).
The library's sans-I/O `ClientProtocol` does the opening handshake and its checks;
`wsconn.py` says what is done here and what is left to the library.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module

from websockets.client import ClientProtocol
from websockets.http11 import Request, Response
from websockets.uri import parse_uri

from callbridge.wsconn import WSConnection

__all__ = ["AgentSocket", "connect"]


class AgentSocket(WSConnection):
    """One client WebSocket connection. Created by :func:`connect`."""

    def __init__(
        self,
        protocol: ClientProtocol,
        close_timeout: float,
        ping_interval: float | None,
        ping_timeout: float | None,
        max_size: int | None = None,
    ) -> None:
        super().__init__(protocol, close_timeout, ping_interval, ping_timeout, max_size)

    async def recv(self) -> str:  # binary arrives as text (below)
        message = await super().recv()
        assert isinstance(message, str)
        return message

    def _binary(self, data: bytes) -> str:
        # The agent protocol is JSON text; a binary message is handed on as text for the
        # protocol layer to reject with a readable warning.
        return data.decode("utf-8", "replace")

    def _handshake_event(self, event: Request | Response) -> None:
        if isinstance(event, Response) and not self._handshake.done():
            self._handshake.set_result(None)


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
    conn = AgentSocket(protocol, close_timeout, ping_interval, ping_timeout, max_size)
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
    conn._go_fast()
    conn._start_keepalive()
    return conn
