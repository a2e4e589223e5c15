"""The event loop `callbridge serve` runs on: uvloop, minus one thread hop per new connection.

uvloop's `sock_connect` resolves the address it is given, even one that is already an IP
address, and it asks for every socket type (`type=0`), which its own no-thread fast path for
IP literals does not take. So each new outgoing TCP connection made the aiohttp way (the
Twilio SDK's REST client: aiohappyeyeballs then `sock_connect`) waits for a turn of libuv's
thread pool first. On a busy core that thread can wait its turn for a long time: at 175 calls
on one core, the hop took up to 243 ms where the same `getaddrinfo` called directly took at
most 0.18 ms, and the hang-ups that opened a new connection to Twilio's REST API came up to
0.9 s after the goodbye had been heard (BENCHMARKS.md, issue 17).

Here an IP literal with a numeric port is resolved in place, with `AI_NUMERICHOST |
AI_NUMERICSERV`: the C library then parses the address and never looks anything up (no DNS,
no files), so it cannot block. Every other name goes to uvloop's resolver as before. Without
uvloop (Windows, PyPy), this is asyncio's own loop, which already resolves IP literals in
place.

Library users can run on it too: `asyncio.Runner(loop_factory=new_event_loop)`.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

__all__ = ["new_event_loop", "numeric_addrinfo"]

_NUMERIC = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV


def numeric_addrinfo(
    host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
) -> list[Any] | None:
    """`getaddrinfo`'s answer for an IP literal and a numeric port, without a lookup; None
    otherwise (a name, a service name: the C library refuses them in this mode, it does not
    look them up)."""
    if host is None:
        return None
    try:
        return socket.getaddrinfo(host, port, family, type, proto, flags | _NUMERIC)
    except (OSError, TypeError, UnicodeError):
        return None  # let the loop's own resolver answer (and raise) as it would


def _factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop

    class Loop(uvloop.Loop):
        async def getaddrinfo(
            self, host: Any, port: Any, *, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
        ) -> list[Any]:
            found = numeric_addrinfo(host, port, family, type, proto, flags)
            if found is not None:
                return found
            result: list[Any] = await super().getaddrinfo(
                host, port, family=family, type=type, proto=proto, flags=flags
            )
            return result

    return Loop


new_event_loop: Callable[[], asyncio.AbstractEventLoop] = _factory()
"""A new event loop: uvloop where it is installed, with IP literals resolved in place."""
