"""uvicorn's WebSocket protocol class for callbridge: the media stream on a lean path.

uvicorn hands every WebSocket upgrade to its `ws` protocol class. This one looks at the
request's path: the media-stream route (`/twilio/media-stream`, 50 messages a second
per call) is served by `wsserver.ServerSocket`, and every other WebSocket route (the
console's live feed) goes on, untouched, to uvicorn's own `websockets-sansio` protocol,
to which each transport callback is passed on.

The media-stream request still goes through the whole ASGI app (proxy headers,
routing, the signature check, the draining state): its scope carries the connection
itself under the `DIRECT_SOCKET` extension, and the route uses it as its
`MessageSocket`. So no ASGI message is built, queued or awaited per frame, and reading
is not paused and resumed around each one, as uvicorn's glue does. The ASGI messages
are served too (`websocket.accept`, `.send`, `.close`), for middleware that answers
the upgrade itself (an error before the route accepts).

Written here, not taken from a library: uvicorn offers no hook between its HTTP parser
and its WebSocket protocol other than this class (`Config.ws`), and the measured cost
was in that glue (BENCHMARKS.md, issue 17).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any
from urllib.parse import unquote

from uvicorn.config import Config
from uvicorn.protocols.utils import ClientDisconnected, get_local_addr, get_remote_addr, is_ssl
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.http11 import Request

from callbridge.telephony.twilio.webhooks import MEDIA_STREAM_PATH
from callbridge.transport import DIRECT_SOCKET, SocketClosed
from callbridge.wsserver import ServerSocket

__all__ = ["LEAN_PATHS", "LeanWebSocketProtocol"]

log = logging.getLogger("callbridge.server")

# The WebSocket routes served on `ServerSocket`; the rest on uvicorn's own protocol.
LEAN_PATHS = frozenset({MEDIA_STREAM_PATH})
# `CALLBRIDGE_WS_PROTOCOL=uvicorn`: every WebSocket route on uvicorn's own protocol (the
# media stream through Starlette's WebSocket, as before issue 17): a fallback, and the A/B.
FALLBACK_ENV = "CALLBRIDGE_WS_PROTOCOL"
# How long a close waits for the peer's answer before the TCP connection is dropped.
CLOSE_TIMEOUT_S = 2.0


def _request_path(data: bytes) -> str:
    """The path of an upgrade request's first line (`GET /path?query HTTP/1.1`), unquoted."""
    line = data.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    target = parts[1] if len(parts) == 3 else b""
    return unquote(target.split(b"?", 1)[0].decode("latin-1"))


class LeanWebSocketProtocol(ServerSocket):
    """`uvicorn.Config(ws=LeanWebSocketProtocol)`: see the module's docstring."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not config.loaded:
            config.load()  # pragma: no cover - uvicorn loads it before serving
        super().__init__(
            max_size=config.ws_max_size,
            close_timeout=CLOSE_TIMEOUT_S,
            ping_interval=config.ws_ping_interval,
            ping_timeout=config.ws_ping_timeout,
        )
        self.config = config
        self.server_state = server_state
        self.app_state = app_state
        self._routed = False
        self._delegate: WebSocketsSansIOProtocol | None = None
        self._connected_sent = False

    # -- asyncio.Protocol: route on the first data, then pass on or serve -----------------

    def data_received(self, data: bytes) -> None:
        if self._delegate is not None:
            self._delegate.data_received(data)
            return
        if not self._routed:
            self._routed = True
            if _request_path(data) not in LEAN_PATHS or os.environ.get(FALLBACK_ENV) == "uvicorn":
                self._delegate = WebSocketsSansIOProtocol(
                    config=self.config, server_state=self.server_state, app_state=self.app_state
                )
                self._delegate.connection_made(self.transport)
                self._delegate.data_received(data)
                return
            self.server_state.connections.add(self)  # type: ignore[arg-type]
        super().data_received(data)

    def eof_received(self) -> bool | None:
        if self._delegate is not None:
            self._delegate.eof_received()
            return None
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._delegate is not None:
            self._delegate.connection_lost(exc)
            return
        self.server_state.connections.discard(self)
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        if self._delegate is not None:
            self._delegate.pause_writing()
        else:
            super().pause_writing()

    def resume_writing(self) -> None:
        if self._delegate is not None:
            self._delegate.resume_writing()
        else:
            super().resume_writing()

    def shutdown(self) -> None:
        """uvicorn is stopping (after callbridge's drain): close with 1012 and drop the connection."""
        if not self.accepted:
            self.reject(503, "Service Unavailable")
        else:
            self.start_close(1012, "server stopping")
        self.transport.close()

    # -- the upgrade request goes to the ASGI app ------------------------------------

    def on_request(self, request: Request) -> None:
        raw_path, _, query = request.path.partition("?")
        root_path = self.config.root_path
        subprotocols = [
            token.strip()
            for header in request.headers.get_all("Sec-WebSocket-Protocol")
            for token in header.split(",")
        ]
        scope: dict[str, Any] = {
            "type": "websocket",
            "asgi": {"version": self.config.asgi_version, "spec_version": "2.4"},
            "http_version": "1.1",
            "scheme": "wss" if is_ssl(self.transport) else "ws",
            "server": get_local_addr(self.transport),
            "client": get_remote_addr(self.transport),
            "root_path": root_path,
            "path": root_path + unquote(raw_path),
            "raw_path": (root_path + raw_path).encode("latin-1"),
            "query_string": query.encode("latin-1"),
            "headers": [
                (name.lower().encode("latin-1"), value.encode("latin-1"))
                for name, value in request.headers.raw_items()
            ],
            "subprotocols": subprotocols,
            "state": self.app_state.copy(),
            "extensions": {DIRECT_SOCKET: self},
        }
        task = self._loop.create_task(self._run_asgi(scope))
        self.server_state.tasks.add(task)
        task.add_done_callback(self.server_state.tasks.discard)

    async def _run_asgi(self, scope: dict[str, Any]) -> None:
        try:
            await self.config.loaded_app(scope, self._asgi_receive, self._asgi_send)
        except ClientDisconnected:
            pass
        except Exception:
            log.exception("the media-stream route failed")
            if self.accepted:
                self.start_close(1011, "internal error")
            else:
                self.reject(500, "Internal Server Error")
            return
        if not self.accepted:
            self.reject(500, "Internal Server Error")  # the app returned without an answer
        else:
            self.start_close(1000)

    async def _asgi_receive(self) -> dict[str, Any]:
        if not self._connected_sent:
            self._connected_sent = True
            return {"type": "websocket.connect"}
        try:
            message = await self.receive()
        except SocketClosed as exc:
            return {"type": "websocket.disconnect", "code": exc.code or 1006, "reason": exc.reason}
        if isinstance(message, str):
            return {"type": "websocket.receive", "text": message}
        return {"type": "websocket.receive", "bytes": message}

    async def _asgi_send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "websocket.accept":
            headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in message.get("headers", [])]
            if message.get("subprotocol"):
                headers.append(("Sec-WebSocket-Protocol", message["subprotocol"]))
            self.accept(headers)
        elif kind == "websocket.close":
            if self.accepted:
                self.start_close(int(message.get("code", 1000)), message.get("reason") or "")
            else:
                self.reject(403, "")
        elif kind == "websocket.send" and self.accepted:
            try:
                if message.get("text") is not None:
                    await self.send(message["text"])
                else:
                    await self.send_bytes(bytes(message.get("bytes") or b""))
            except SocketClosed:
                raise ClientDisconnected() from None
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} on the media-stream route")
