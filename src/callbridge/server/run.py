"""Serving the app with uvicorn, with a shutdown that lets live calls finish.

uvicorn's own shutdown fails every open WebSocket with 1012 at once, which would
drop every live phone call mid-sentence. So the first SIGTERM/SIGINT here only
drains: the bridge stops taking calls (webhooks answer the busy TwiML, /healthz
turns 503), live calls get `CALLBRIDGE_SHUTDOWN_GRACE_SECONDS` to finish, the
rest end with `shutdown` (both legs hung up, records saved), and only then does
uvicorn stop. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from types import FrameType

import uvicorn
from starlette.applications import Starlette

from callbridge.logs import log_event
from callbridge.server.state import AppState

__all__ = ["GracefulServer", "make_config"]

log = logging.getLogger("callbridge.server")


def make_config(app: Starlette, host: str, port: int, log_level: str = "warning") -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        lifespan="on",
        ws="websockets-sansio",
        ws_max_size=64 * 1024,  # Twilio frames are ~300 bytes; refuse anything absurd
        ws_per_message_deflate=False,
        proxy_headers=True,
        server_header=False,
    )


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: AppState) -> None:
        super().__init__(config)
        self.state = state
        self._draining: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.started:
            return
        # Only now is the address taken and served: the lifespan ran before.
        for server in getattr(self, "servers", []):
            for sock in server.sockets or ():
                address = sock.getsockname()
                if isinstance(address, tuple):
                    log_event(log, "server.listening", host=address[0], port=address[1])

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining is not None or self._loop is None:
            self.force_exit = True
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self._start_drain, signal.Signals(sig).name)

    def _start_drain(self, signame: str) -> None:
        if self._draining is None:
            self._draining = asyncio.ensure_future(self.drain(signame))

    async def drain(self, why: str = "requested") -> None:
        grace = self.state.settings.shutdown_grace_seconds
        log_event(log, "server.draining", signal=why, live_calls=self.state.bridge.live_calls, grace_s=grace)
        try:
            await self.state.bridge.shutdown(grace)
        finally:
            self.should_exit = True
