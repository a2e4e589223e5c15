"""The carrier leg's WebSocket, server side, on the shared `WSConnection`.

`ServerSocket` is a `MessageSocket` (receive, send, close; `SocketClosed` when the peer
is gone) over one server connection. The library's sans-I/O `ServerProtocol` reads and
checks the opening handshake; `accept()` answers 101 and from then on plain frames are
parsed inside `data_received` (`wsconn.py`). It runs under uvicorn
(`server/wsroute.py`) and on its own listening socket (:func:`serve`: the library's
`Bridge.serve_websockets`, tests and benchmarks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence

from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

from callbridge.transport import closed_from
from callbridge.wsconn import WSConnection

__all__ = ["ServerSocket", "serve"]

log = logging.getLogger("callbridge.ws")


class ServerSocket(WSConnection):
    """One server-side WebSocket connection, from the upgrade request on."""

    def __init__(
        self,
        *,
        max_size: int | None,
        close_timeout: float = 2.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
    ) -> None:
        protocol = ServerProtocol(max_size=max_size, logger=log)
        super().__init__(protocol, close_timeout, ping_interval, ping_timeout, max_size)
        self.server_protocol = protocol
        self.request: Request | None = None
        self.response: Response | None = None
        self.accepted = False

    # -- the opening handshake ----------------------------------------------------------

    def _handshake_event(self, event: Request | Response) -> None:
        if isinstance(event, Request) and self.request is None:
            self.request = event
            self.response = self.server_protocol.accept(event)
            if self.response.status_code != 101:
                self._refuse(self.response)
                return
            self.on_request(event)

    def on_request(self, request: Request) -> None:
        """A valid upgrade request arrived; answer it with `accept()` or `reject()`."""

    def _refuse(self, response: Response) -> None:
        self.server_protocol.send_response(response)
        self._flush()
        self.transport.close()
        if not self._handshake.done():
            self._handshake.set_exception(ConnectionError(f"handshake refused ({response.status_code})"))

    def accept(self, headers: Iterable[tuple[str, str]] = ()) -> None:
        """Answer 101: the connection is open."""
        if self.accepted or self.response is None or self.transport.is_closing():
            return
        self.accepted = True
        for name, value in headers:
            self.response.headers[name] = value
        self.server_protocol.send_response(self.response)
        self._flush()
        if not self._handshake.done():
            self._handshake.set_result(None)
        self._go_fast()
        self._start_keepalive()

    def reject(self, status: int, text: str) -> None:
        """Answer the upgrade request with an HTTP error instead of 101."""
        if self.accepted or self.transport.is_closing():
            return
        self._refuse(self.server_protocol.reject(status, text))

    # -- MessageSocket -----------------------------------------------------------------

    async def receive(self) -> str | bytes:
        try:
            return await self.recv()
        except ConnectionClosed as exc:
            raise closed_from(exc) from None

    async def send(self, text: str) -> None:
        try:
            await super().send(text)
        except ConnectionClosed as exc:
            raise closed_from(exc) from None

    async def send_bytes(self, data: bytes) -> None:
        try:
            await super().send_bytes(data)
        except ConnectionClosed as exc:
            raise closed_from(exc) from None

    async def send_many(self, texts: Iterable[str]) -> None:
        try:
            await super().send_many(texts)
        except ConnectionClosed as exc:
            raise closed_from(exc) from None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if not self.accepted:
            self.reject(403, "")
            return
        with contextlib.suppress(Exception):
            await super().close(code, reason)


Handler = Callable[[ServerSocket], Awaitable[None]]


class _Served(ServerSocket):
    """A connection of :func:`serve`: accepted (on a path listed), then handed to the handler."""

    def __init__(
        self,
        handler: Handler,
        paths: Sequence[str] | None,
        tasks: set[asyncio.Task[None]],
        max_size: int | None,
        close_timeout: float,
    ) -> None:
        super().__init__(max_size=max_size, close_timeout=close_timeout)
        self._handler = handler
        self._paths = paths
        self._tasks = tasks

    def on_request(self, request: Request) -> None:
        if self._paths is not None and request.path.partition("?")[0] not in self._paths:
            self.reject(404, "Not Found")
            return
        self.accept()
        task = self._loop.create_task(self._run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self) -> None:
        code = 1011
        try:
            await self._handler(self)
            code = 1000
        except Exception:
            log.exception("WebSocket handler failed")
        finally:
            await self.close(code)


@contextlib.asynccontextmanager
async def serve(
    handler: Handler,
    host: str,
    port: int,
    *,
    paths: Sequence[str] | None = None,
    max_size: int | None,
    close_timeout: float = 2.0,
) -> AsyncIterator[asyncio.Server]:
    """A WebSocket server of `ServerSocket`s (on `paths` if given; other paths get 404)."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    server = await loop.create_server(
        lambda: _Served(handler, paths, tasks, max_size, close_timeout), host, port
    )
    try:
        yield server
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
