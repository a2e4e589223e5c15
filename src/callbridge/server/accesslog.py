"""The HTTP access log: one line per request (method, path, status, duration), as a pure ASGI
middleware so that streamed and WebSocket routes are untouched.

Logged at info when the log is JSON (for pipelines) and at debug otherwise (a person reading
the console wants the calls, not every Twilio callback). The query string is never logged:
it may carry tokens. A path naming a call (`/calls/CA...`) gives the line its `call_sid`.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from callbridge.logs import json_mode, log_event

__all__ = ["AccessLog"]

log = logging.getLogger("callbridge.http")
_CALL_SID = re.compile(r"/(CA[0-9a-fA-F]{32})(?:/|$)")


class AccessLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._level: int | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._level is None:  # logging is configured before the first request
            self._level = logging.INFO if json_mode() else logging.DEBUG
        level = self._level
        if not log.isEnabledFor(level):
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: dict[str, Any] = {"code": 500}  # an exception before the response starts

        async def send_and_see(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_see)
        finally:
            path: str = scope.get("path", "")
            found = _CALL_SID.search(path)
            log_event(
                log,
                "http.access",
                level,
                method=scope.get("method"),
                path=path,
                status=status["code"],
                duration_ms=round((time.perf_counter() - start) * 1000, 1),
                call_sid=found.group(1) if found else None,
            )
