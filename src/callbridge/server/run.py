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
import contextvars
import logging
import signal
import socket
import time
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette

from callbridge.logs import bind_call, log_event
from callbridge.server.state import AppState
from callbridge.server.wsroute import LeanWebSocketProtocol

__all__ = ["GracefulServer", "make_config"]

log = logging.getLogger("callbridge.server")


# uvicorn's options for callbridge, one process or gunicorn workers (server/workers.py).
UVICORN_OPTIONS: dict[str, Any] = {
    # uvloop where it is installed, without a thread-pool hop per new outgoing connection
    # (eventloop.py: the hang-up's REST connection waited up to 0.9 s for it on a busy core).
    "loop": "callbridge.eventloop:new_event_loop",
    "access_log": False,
    "lifespan": "on",
    # The media stream on callbridge's own WebSocket connection, the rest on uvicorn's
    # websockets-sansio (server/wsroute.py; CALLBRIDGE_WS_PROTOCOL=uvicorn: all on uvicorn's).
    "ws": LeanWebSocketProtocol,
    "ws_max_size": 64 * 1024,  # Twilio frames are ~300 bytes; refuse anything absurd
    "ws_per_message_deflate": False,
    "proxy_headers": True,
    "server_header": False,
}
# A second signal within this long is the same press seen twice (a terminal's Ctrl-C reaches
# gunicorn's workers directly and again through the arbiter's SIGTERM), not "stop now".
SAME_PRESS_S = 1.0
# The second press ends live calls at once; this bounds their teardown (hang-ups, records).
ENDING_TIMEOUT_S = 10.0


def make_config(app: Starlette, host: str, port: int, log_level: str = "warning") -> uvicorn.Config:
    # log_config=None: uvicorn's own lines go through callbridge's handler (JSON or text, with
    # the instance id), not a format of uvicorn's.
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, log_config=None, **UVICORN_OPTIONS)


def _calls(n: int) -> str:
    return f"{n} live call{'s' if n != 1 else ''}"


def say_draining(live: int, grace: float) -> None:
    """The first Ctrl-C (or SIGTERM), in words on the log (stderr)."""
    if live:
        log.warning(
            "draining %s, up to %g s; press Ctrl-C again to end %s now",
            _calls(live),
            grace,
            "it" if live == 1 else "them",
        )
    else:
        log.warning("no live calls: stopping")


def say_ending_now(live: int) -> None:
    """The second Ctrl-C: live calls end at once (`shutdown`: hung up, records written)."""
    # Said from the signal handler, inside whatever task was running: not that call's line.
    contextvars.Context().run(log.warning, "ending %s now (end reason shutdown) and stopping", _calls(live))


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: AppState) -> None:
        super().__init__(config)
        self.state = state
        self._draining: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._first_signal = 0.0
        self._ending: asyncio.Task[None] | None = None

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
        if self._first_signal and time.monotonic() - self._first_signal < SAME_PRESS_S:
            return
        if self._first_signal or self._loop is None:
            self.stop_now()
            return
        self._first_signal = time.monotonic()
        self._loop.call_soon_threadsafe(self._start_drain, signal.Signals(sig).name)

    def stop_now(self) -> None:
        """Stop without waiting for live calls (they end `shutdown`, records written)."""
        if self._loop is None or self._ending is not None:  # asked again while ending: now
            self.force_exit = True
            self.should_exit = True
            return
        say_ending_now(self.state.bridge.live_calls)
        self._loop.call_soon_threadsafe(self._end_calls_now)

    def _end_calls_now(self) -> None:
        # The calls are ended here, before uvicorn stops: a forced uvicorn exit would close
        # their media streams (1012) first, and skip the lifespan that writes the records.
        async def end() -> None:
            bind_call(None)  # (a signal lands in whatever task runs: not that call's line)
            try:
                async with asyncio.timeout(ENDING_TIMEOUT_S):
                    await self.state.bridge.shutdown(0)
            except TimeoutError:
                log.warning("live calls did not end within %g s: stopping anyway", ENDING_TIMEOUT_S)
            finally:
                self.should_exit = True

        if self._ending is None:
            self._ending = asyncio.ensure_future(end())

    def _start_drain(self, signame: str) -> None:
        if self._draining is None:
            self._draining = asyncio.ensure_future(self.drain(signame))

    async def drain(self, why: str = "requested") -> None:
        bind_call(None)  # started from a signal, which lands in whatever task runs
        grace = self.state.settings.shutdown_grace_seconds
        log_event(log, "server.draining", signal=why, live_calls=self.state.bridge.live_calls, grace_s=grace)
        say_draining(self.state.bridge.live_calls, grace)
        try:
            await self.state.bridge.shutdown(grace)
        finally:
            self.should_exit = True
